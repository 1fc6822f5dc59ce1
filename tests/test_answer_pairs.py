"""Neutral answer tokens: the question rewrite, the data and eval options, and scoring and
training on the pair the rows ask for."""

import pytest
import torch

from introspect import models
from introspect.data import DataConfig, make_examples, split
from introspect.detection import ANSWER_PAIRS, ask_for
from introspect.errors import IntrospectError
from introspect.examples import normalise, score_examples, tokenise_examples, tokenised_prompts
from introspect.train import preset, train
from introspect.vectors import VectorSet, random_vectors

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


def test_the_question_says_which_answer_means_what():
    q = "Has a vector been added to your residual stream? Please answer yes or no."
    assert ask_for(q, "yes-no") == q
    assert ask_for(q, "red-blue") == (
        "Has a vector been added to your residual stream? Answer Red if yes and Blue if no."
    )
    assert ask_for("Is it odd?", "red-blue").endswith("? Answer Red if yes and Blue if no.")
    with pytest.raises(IntrospectError, match="answers: 'up-down'"):
        ask_for(q, "up-down")


def test_data_rows_carry_the_pair_and_tokenise_to_it(tiny):
    config = DataConfig(n=40, answers="red-blue", magnitude_mode="absolute")
    df = make_examples(config, 4, VS)
    assert (df["answers"] == "red-blue").all()
    assert df["detection_question"].str.endswith("Answer Red if yes and Blue if no.").all()
    plain = make_examples(DataConfig(n=40, magnitude_mode="absolute"), 4, VS)
    assert "answers" not in plain.columns  # the yes/no default adds no column
    # The same draw otherwise: the neutral data differ from yes/no data only in the question.
    assert (df["context_prompt"] == plain["context_prompt"]).all()
    red, blue = (tiny.tokenizer.encode(t)[0] for t in ANSWER_PAIRS["red-blue"])
    ids = tokenise_examples(tiny.tokenizer, normalise(df))["answer_ids"]
    assert all(list(a) == [red, blue] for a in ids)
    with pytest.raises(IntrospectError, match="field 'answers' is 'maybe'"):
        normalise(df.assign(answers="maybe"))


def test_scores_are_the_pairs_softmax_of_a_plain_forward(tiny):
    config = DataConfig(n=2, answers="red-blue", steered_fraction=0.0, magnitude_mode="absolute")
    row = make_examples(config, 4, VS)
    got = score_examples(tiny, normalise(row), {"random": VS})
    tok = tiny.tokenizer
    r = row.iloc[0]
    text = tok.apply_chat_template(
        [{"role": "user", "content": r.context_prompt},
         {"role": "assistant", "content": r.assistant_response},
         {"role": "user", "content": r.detection_question},
         {"role": "assistant", "content": "The answer is"}],
        tokenize=False, continue_final_message=True,
    )  # fmt: skip
    with torch.no_grad():
        z = tiny.model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, -1]
    ids = [tok.encode(t, add_special_tokens=False)[0] for t in (" Red", " Blue")]
    p = z.double().softmax(-1)[ids]
    assert got["p_yes"].iloc[0] == pytest.approx(float(p[0] / p.sum()), abs=1e-5)
    assert got["yes_no_mass"].iloc[0] == pytest.approx(float(p.sum()), rel=1e-3)


def test_answer_loss_is_the_pair_loss_plus_the_mass_term():
    from introspect.train import answer_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    ids = torch.tensor([[3, 7]] * 6)
    targets = torch.tensor([0, 1, 1, 0, 0, 1])
    pair = logits.log_softmax(-1).gather(1, ids)
    # Weight 0: the 2-way cross-entropy on the raw pair logits (the softmax ignores the shift).
    assert answer_loss(pair, targets) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits.gather(1, ids), targets)), rel=1e-6
    )
    # Weight 1: the full-vocabulary cross-entropy on the target's token.
    token = ids.gather(1, targets[:, None])[:, 0]
    full = torch.nn.functional.cross_entropy(logits, token, reduction="sum")
    assert answer_loss(pair, targets, 1.0, "sum") == pytest.approx(float(full), rel=1e-6)


def _pair_mass(lm, prompts) -> float:
    from introspect.train import answer_pair

    with torch.no_grad():
        return float(answer_pair(lm.model, prompts, lm.tokenizer.pad_token_id).exp().sum(-1).mean())


@pytest.mark.parametrize("mass_weight", [0.0, 1.0])
def test_training_on_the_neutral_pair_learns_it(tmp_path, mass_weight):
    from introspect.train import validate

    config = DataConfig(n=120, answers="red-blue", magnitudes=[8.0, 16.0],
                        magnitude_mode="absolute")  # fmt: skip
    train_df, val_df = split(make_examples(config, 4, VS), 0.2, seed=0)
    lm = models.load("tiny-random", device="cpu")
    rows = normalise(val_df)
    prompts = tokenised_prompts(tokenise_examples(lm.tokenizer, rows), {"random": VS}, 4, 64)
    red = lm.tokenizer.encode(" Red")[0]
    assert all(p.answer_ids[0] == red for p in prompts)
    labels, pad = rows["label"].tolist(), lm.tokenizer.pad_token_id
    _, loss0 = validate(lm.model, prompts, labels, pad, 8)
    mass0 = _pair_mass(lm, prompts)
    steps = dict(lr=5e-3, warmup_steps=2, batch_size=4, eval_every=12, save_every=12,
                 max_steps=12, mass_weight=mass_weight)  # fmt: skip
    train(lm, train_df, val_df, {"random": VS}, preset("original", **steps), tmp_path / "run")
    _, loss1 = validate(lm.model, prompts, labels, pad, 8)
    assert loss1 < loss0  # the 2-way loss on the Red/Blue pair went down either way
    mass1 = _pair_mass(lm, prompts)
    if mass_weight:
        assert mass1 > 2 * mass0, (mass0, mass1)  # the answer format is learnt (3.4x)
    else:
        # The reference's 2-way loss leaves the mass about where it was (1.1x).
        assert mass1 < 1.5 * mass0, (mass0, mass1)
