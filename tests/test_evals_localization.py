"""B7 localisation probes and Phase C: balanced labels, sentence positions, steering only the
chosen sentence, scoring, metrics, and a tiny training run."""

import json

import numpy as np
import pandas as pd
import pytest

from introspect.data import layer_ranges
from introspect.detection import DetectionExample, build_prompt
from introspect.evals.common import read_resource
from introspect.evals.localization import (
    MAX_SENTENCES,
    LocalizationConfig,
    context_text,
    localization_metrics,
    localization_prompts,
    localization_trials,
    marks,
    question,
    run_localization,
    score_localization,
    sentence_positions,
)
from introspect.localize_train import LocalizeTrainConfig, localization_data
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals
NORMS = [10.0 * (i + 1) for i in range(30)]


def test_trials_are_balanced_and_labels_match_the_steering():
    trials = localization_trials(30, NORMS, range(100, 200), 30, "eval", seed=1)
    assert trials["key"].is_unique and len(trials) == 90
    ranges = list(layer_ranges(30).values())
    factors = read_resource("localization.json")["strength_factors"]
    for q, df in trials.groupby("question"):
        assert df["label"].value_counts().tolist() == [10, 10, 10], q
    for r in trials.itertuples():
        start, end = ranges[["early", "middle", "late"].index(r.layers)]
        assert (r.layer_start, r.layer_end) == (start, end)
        level = ["weak", "medium", "strong"].index(r.strength)
        assert r.magnitude == pytest.approx(factors[level] * np.mean(NORMS[start:end]))
        truth = {"layers": ["early", "middle", "late"].index(r.layers), "strength": level}
        assert r.label == truth.get(r.question, r.steered_sentence)
        assert 100 <= r.vector_idx < 200
    sentences = read_resource("localization.json")["sentences"]
    used = {s for x in trials["sentences"] for s in json.loads(x)}
    assert used <= set(sentences[1::2])


def test_sentence_positions_cover_exactly_that_sentence(tiny):
    tok = tiny.tokenizer
    sentences = ["The library opens at nine.", "My cat is green.", "Rain fell last night."]
    ex = DetectionExample(" ".join(sentences), "Thanks.", "Which sentence?")
    prefix = build_prompt(tok, ex).prefix_ids
    spans = [sentence_positions(tok, ex, sentences, k) for k in range(3)]
    for (a, b), s in zip(spans, sentences, strict=True):
        assert tok.decode(prefix[a:b]).strip() == s
    assert spans[0][1] == spans[1][0] and spans[1][1] == spans[2][0]  # adjacent, no overlap


# Qwen2.5-Instruct's chat template (its no-tools branch, with the default system prompt it adds
# when there is none), applied here with SmolLM2's tokenizer: Qwen's own tokenizer is a hub
# download. The character offsets are what the template changes.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("kind", "with_mark"),
    [("none", False), ("numbers", False), ("letters", False), ("letters", True)],
)
@pytest.mark.parametrize("template", ["shipped", "qwen2.5"])
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_steered_positions_are_exactly_the_sentence_in_every_template(
    tiny, template, system_prompt, kind, with_mark
):
    """Every one of ten sentences, in contexts drawn as the trials draw them: the steered token
    slice decodes to that sentence (``with_mark``: its mark 'C. ' with it), the slices tile the
    message (unsteered marks '2. ', 'B. ' ... lie between them, never inside), and no template
    token (role header, system prompt, end-of-turn) is inside any of them."""
    import copy

    tok = copy.deepcopy(tiny.tokenizer)
    if template == "qwen2.5":
        tok.chat_template = QWEN25_TEMPLATE
    trials = localization_trials(30, NORMS, range(5), 4, "eval", ["sentence"], seed=3,
                                 n_sentences=MAX_SENTENCES)  # fmt: skip
    for r in trials.itertuples():
        sentences = json.loads(r.sentences)
        ex = DetectionExample(context_text(sentences, kind), "Thanks.", "Which one?",
                              system_prompt)  # fmt: skip
        prefix = build_prompt(tok, ex).prefix_ids
        spans = [sentence_positions(tok, ex, sentences, k, kind, with_mark)
                 for k in range(len(sentences))]  # fmt: skip
        shown = [m + s for m, s in zip(marks(len(sentences), kind), sentences, strict=True)]
        for (a, b), s, line in zip(spans, sentences, shown, strict=True):
            assert tok.decode(prefix[a:b]).strip() == (line.strip() if with_mark else s)
        between = [tok.decode(prefix[spans[k][1] : spans[k + 1][0]]).strip()
                   for k in range(len(spans) - 1)]  # fmt: skip
        left_out = [m.strip() for m in marks(len(sentences), kind)]
        assert between == ([""] * (len(spans) - 1) if with_mark else left_out[1:])
        first = tok.decode(prefix[spans[0][0] - 2 : spans[0][0]]).strip()
        assert first.endswith(left_out[0]) or with_mark  # the first mark just before it
        inside = tok.decode(prefix[spans[0][0] : spans[-1][1]])
        text = context_text(sentences, kind)
        assert inside.strip() == (text if with_mark else text.removeprefix(marks(1, kind)[0]))
        assert "<|im_" not in inside and "assistant" not in inside


def test_letter_marks_ask_for_the_letter_and_steer_it_with_its_sentence(tiny):
    """``sentence_marks: letters`` with ``steer_marks``: the question lists A ... J, the answers
    are the ten letters, and the steered slice starts at the chosen sentence's letter."""
    trials = localization_trials(30, NORMS, range(5), 10, "eval", ["sentence"], seed=5,
                                 n_sentences=10, marks="letters", steer_marks=True)  # fmt: skip
    vectors = random_vectors(tiny.d_model, 5, 0)
    prompts = localization_prompts(tiny.tokenizer, trials, vectors)
    letters = [tiny.tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in "ABCDEFGHIJ"]
    for r, p in zip(trials.itertuples(), prompts, strict=True):
        assert list(p.answer_ids) == letters
        a, b = p.steering.positions
        steered = tiny.tokenizer.decode(p.prefix_ids[a:b]).strip()
        sentence = json.loads(r.sentences)[r.label]
        assert steered == f"{'ABCDEFGHIJ'[r.label]}. {sentence}"
    text = tiny.tokenizer.decode(prompts[0].suffix_ids)
    assert "A, B, C, D, E, F, G, H, I or J" in text


def test_steer_marks_needs_marks():
    from introspect.config import parse
    from introspect.errors import IntrospectError

    with pytest.raises(IntrospectError, match="steer_marks"):
        parse(LocalizationConfig, {"model": "tiny-random", "steer_marks": True})


def test_ten_sentence_trials_ask_with_ten_single_token_answers(tiny):
    trials = localization_trials(30, NORMS, range(100, 200), 40, "eval", seed=4,
                                 n_sentences=10)  # fmt: skip
    sentence = trials[trials["question"] == "sentence"]
    assert sentence["label"].value_counts().tolist() == [4] * 10  # balanced over ten
    assert (sentence["n_options"] == 10).all()
    assert (trials.loc[trials["question"] != "sentence", "n_options"] == 3).all()
    assert trials["steered_sentence"].between(0, 9).all()
    assert all(len(json.loads(x)) == 10 for x in trials["sentences"])
    text, answers = question(read_resource("localization.json"), "sentence", 10)
    assert text.startswith("My previous message had ten sentences.")
    assert "first, second, third, fourth, fifth, sixth, seventh, eighth, ninth or tenth" in text
    prompts = localization_prompts(tiny.tokenizer, trials, random_vectors(tiny.d_model, 200, 0))
    for p, r in zip(prompts, trials.itertuples(), strict=True):
        assert len(p.answer_ids) == r.n_options == len(set(p.answer_ids))
    assert len(question(read_resource("localization.json"), "sentence", 3)[1]) == 3


def test_prompts_steer_the_chosen_sentence_with_three_answers(tiny):
    trials = localization_trials(4, [1.0] * 4, range(0, 5), 3, "train", seed=2)
    vectors = random_vectors(tiny.d_model, 5, 0)
    prompts = localization_prompts(tiny.tokenizer, trials, vectors)
    tok = tiny.tokenizer
    for p, r in zip(prompts, trials.itertuples(), strict=True):
        a, b = p.steering.positions
        chosen = json.loads(r.sentences)[r.steered_sentence]
        assert tok.decode(p.prefix_ids[a:b]).strip() == chosen
        assert len(p.answer_ids) == 3 and len(set(p.answer_ids)) == 3
        assert (p.steering.layer_start, p.steering.layer_end) == (r.layer_start, r.layer_end)
        assert p.steering.magnitude == r.magnitude


def test_metrics_from_scripted_predictions():
    results = pd.DataFrame(
        {
            "question": ["layers"] * 6 + ["sentence"] * 3,
            "label": [0, 1, 2, 0, 1, 2, 0, 1, 2],
            "predicted": [0, 0, 0, 0, 1, 2, 2, 1, 0],
            "answer_mass": [0.5] * 9,
            "n_options": [3] * 9,
        }
    )
    m = localization_metrics(results)
    assert m["layers"]["accuracy"]["successes"] == 4 and m["layers"]["accuracy"]["n"] == 6
    assert m["layers"]["confusion"] == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert m["layers"]["answer_rates"] == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert m["sentence"]["accuracy"]["rate"] == pytest.approx(1 / 3)
    assert m["layers"]["answers"] == ["early", "middle", "late"]
    assert m["layers"]["prior_accuracy"]["rate"] == pytest.approx(2 / 6)  # label 0: 2 of 6
    assert m["layers"]["chance"] == pytest.approx(1 / 3)


def test_ten_way_metrics_from_scripted_predictions():
    labels = [k % 10 for k in range(20)] + [0, 0]  # label 0 three times: the prior's answer
    predicted = labels[:15] + [9] * 7  # 15 right, then "tenth" every time
    results = pd.DataFrame({"question": "sentence", "label": labels, "predicted": predicted,
                            "answer_mass": 1.0, "n_options": 10})  # fmt: skip
    m = localization_metrics(results)["sentence"]
    assert np.array(m["confusion"]).shape == (10, 10)
    assert m["accuracy"]["successes"] == 16 and m["accuracy"]["n"] == 22  # + the label-9 row
    assert m["chance"] == pytest.approx(0.1) and m["n_options"] == 10
    assert m["prior_accuracy"]["successes"] == 4  # label 0: rows 0, 10, 20, 21
    assert m["answers"][-1] == "tenth" and m["answer_rates"][9] == pytest.approx(8 / 22)



def test_the_mass_filter_leaves_out_low_mass_trials():
    results = pd.DataFrame({"question": ["layers"] * 4, "label": [0, 1, 2, 0],
                            "predicted": [0, 1, 0, 1],
                            "answer_mass": [0.9, 0.6, 0.2, 0.1]})  # fmt: skip
    m = localization_metrics(results, min_mass=0.5)["layers"]
    assert m["excluded"] == 2 and m["accuracy"]["successes"] == 2 and m["accuracy"]["n"] == 2
    assert m["mean_answer_mass"] == pytest.approx(0.45)  # of all trials
    assert localization_metrics(results)["layers"]["accuracy"]["n"] == 4

def test_per_shard_function_and_stage_on_tiny(tiny, tmp_path):
    trials = localization_trials(4, [1.0] * 4, range(0, 5), 3, "eval", seed=0)
    out = score_localization(tiny, trials.iloc[::-1], random_vectors(tiny.d_model, 5, 0))
    assert list(out["key"]) == list(trials["key"].iloc[::-1])
    assert all(len(p) == 3 and abs(sum(p) - 1) < 1e-5 for p in out["probs"])
    m = run_localization({"model": "tiny-random", "n_per_question": 3}, tmp_path, lm=tiny)
    assert set(m["questions"]) == {"layers", "strength", "sentence"}
    assert "### B7" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "localization.png").stat().st_size > 1000


def test_phase_c_data_uses_training_sentences_and_vectors(tiny):
    cfg = LocalizeTrainConfig(model="tiny-random", n_train=30, n_val=6)
    train, val, _ = localization_data(tiny, cfg, [1.0] * tiny.n_layers)
    assert len(train) == 30 and len(val) == 6
    assert train["vector_idx"].max() < 100 and set(train["question"]) == {
        "layers",
        "strength",
        "sentence",
    }
    sentences = read_resource("localization.json")["sentences"]
    assert {s for x in train["sentences"] for s in json.loads(x)} <= set(sentences[0::2])
    assert not set(train["key"]) & set(val["key"])


def test_phase_c_trains_and_evaluates_on_tiny(tmp_path):
    from introspect import models
    from introspect.localize_train import run_localization_training

    lm = models.load("tiny-random", device="cpu")  # trained in place: not the shared fixture
    config = {
        "model": "tiny-random",
        "n_train": 24,
        "n_val": 6,
        "n_per_question": 3,
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "save_every": 3},
    }
    m = run_localization_training(config, tmp_path, lm=lm)
    assert m["training"]["steps"] == 3
    assert set(m["after"]) == set(m["before"]) == {"layers", "strength", "sentence"}
    assert (tmp_path / "run" / "final").is_dir()
    assert "### Phase C" in (tmp_path / "summary.md").read_text()
    # The base model's answers on the same trials, every row (the rates leave low-mass ones out).
    base, trained = (pd.read_parquet(tmp_path / f) for f in ("results_base.parquet",
                                                             "results.parquet"))  # fmt: skip
    assert sorted(base["key"]) == sorted(trained["key"]) and len(base) == 9


def test_phase_c_says_plainly_whether_each_question_is_above_chance():
    from introspect.localize_train import verdicts

    def m(successes, n, ci, chance=1 / 3, excluded=0):
        acc = {"rate": successes / n if n else 0.0, "successes": successes, "n": n, "ci": ci}
        return {"accuracy": acc, "chance": chance, "excluded": excluded, "mean_answer_mass": 0.1}

    text = verdicts({"layers": m(20, 30, [0.48, 0.81]), "sentence": m(4, 30, [0.05, 0.3], 0.1),
                     "strength": m(0, 0, [0.0, 1.0], excluded=30)}, 30, 240)  # fmt: skip
    lines = text.splitlines()
    assert lines[0].startswith("- **layers**: above chance (0.67 [0.48, 0.81] against 0.33)")
    assert lines[1].startswith("- **sentence**: not above chance: 0.13 [0.05, 0.30] against 0.10")
    assert "after only 30 steps on 240 trials" in lines[1]
    assert lines[2].startswith("- **strength**: not measurable: all 30 trials are under the mass")


def test_the_layers_and_strength_questions_can_steer_the_whole_message(tiny):
    trials = localization_trials(4, [1.0] * 4, range(5), 6, "eval", seed=5, n_sentences=4,
                                 steer="message")  # fmt: skip
    whole = trials["question"] != "sentence"
    assert (trials.loc[whole, "steered_sentence"] == -1).all()
    assert trials.loc[~whole, "steered_sentence"].between(0, 3).all()
    prompts = localization_prompts(tiny.tokenizer, trials, random_vectors(tiny.d_model, 5, 0))
    for p, r in zip(prompts, trials.itertuples(), strict=True):
        a, b = p.steering.positions
        sentences = json.loads(r.sentences)
        steered = " ".join(sentences) if r.steered_sentence < 0 else sentences[r.steered_sentence]
        assert tiny.tokenizer.decode(p.prefix_ids[a:b]).strip() == steered
    # The same draw as one-sentence trials otherwise (labels, layers, strengths, sentences).
    one = localization_trials(4, [1.0] * 4, range(5), 6, "eval", seed=5, n_sentences=4)
    same = ["label", "layers", "strength", "sentences", "vector_idx"]
    assert trials[same].equals(one[same])


def test_layer_ranges_restrict_the_sentence_and_strength_trials_only():
    free = localization_trials(30, NORMS, range(5), 30, "train", seed=5, n_sentences=10)
    early = localization_trials(30, NORMS, range(5), 30, "train", seed=5, n_sentences=10,
                                allowed_ranges=["early"])  # fmt: skip
    for q in ("sentence", "strength"):
        assert set(early.loc[early["question"] == q, "layers"]) == {"early"}
        assert set(free.loc[free["question"] == q, "layers"]) == {"early", "middle", "late"}
    layers = early[early["question"] == "layers"]
    assert layers["layers"].value_counts().tolist() == [10, 10, 10]
    assert (early["layer_start"][early["layers"] == "early"] == 0).all()
