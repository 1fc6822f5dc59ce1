"""Checks of introspect.detection against plain forwards and hand-built steered caches."""

import math
import random

import pytest
import torch

from introspect.detection import (
    DetectionExample,
    answer_probabilities,
    answer_token_ids,
    build_prompt,
    collate,
    detection_logits,
    score_detection,
    steered_cache,
    suffix_logits,
)
from introspect.errors import IntrospectError
from introspect.models import backbone, cache_kwargs, output_cache
from introspect.steering import Steering, steer

QUESTION = "Do you detect an injected thought?"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def example(context, response="Sure.", question=QUESTION, steering=None, system=None):
    return DetectionExample(context, response, question, system_prompt=system, steering=steering)


def mixed_rows(n_layers: int, d_model: int) -> list[DetectionExample]:
    """Rows with their own vector, depth range and magnitude or none, and lengths that differ."""
    mid = n_layers // 2
    return [
        example("Tell me about cats.", steering=Steering(unit(d_model, 1), 0, mid, 50.0)),
        example(
            "Write a long poem about the sea, the wind and the stars over the harbour tonight.",
            "Here is a poem about the sea and the wind.",
        ),
        example(
            "Hi",
            "Hello there! How can I help you today? Ask me anything at all.",
            steering=Steering(unit(d_model, 2), mid, n_layers, 8.0),
        ),
        example(
            "What is two plus two?",
            "Four.",
            question="Do you notice anything unusual about your thoughts? Answer yes or no.",
            steering=Steering(unit(d_model, 3), 1, 2, 20.0),
        ),
        example("Name a colour.", "Blue.", system="Be terse."),
        example(
            "Summarise the plot of a film you like in one sentence.",
            "A robot learns to love.",
            steering=Steering(unit(d_model, 4), 0, n_layers, 4.0),
        ),
    ]


def score_alone(lm, rows):
    """Each row scored in its own call: no batch-mates, no padding, no reordering."""
    scores = [score_detection(lm.model, lm.tokenizer, [r], batch_size=1) for r in rows]
    return [s.p_yes[0] for s in scores], [s.yes_no_mass[0] for s in scores]


def assert_scores_match(scores, p_yes, mass):
    assert scores.p_yes == pytest.approx(p_yes, abs=1e-4)
    # The mass of two tokens in a random model is ~1e-5, so compare it relatively.
    assert scores.yes_no_mass == pytest.approx(mass, rel=1e-3)


def assert_batched_equals_alone(lm):
    rows = mixed_rows(lm.n_layers, lm.d_model)
    prompts = [build_prompt(lm.tokenizer, r) for r in rows]
    assert len({len(p.prefix_ids) for p in prompts}) > 1  # prefixes get padded...
    assert len({len(p.suffix_ids) for p in prompts}) > 1  # ...and so do suffixes
    p_yes, mass = score_alone(lm, rows)
    batched = score_detection(lm.model, lm.tokenizer, rows, batch_size=len(rows))
    assert_scores_match(batched, p_yes, mass)


# --- batching ---------------------------------------------------------------------------------


def test_batched_scores_equal_per_row_scores(tiny):
    assert_batched_equals_alone(tiny)


@pytest.mark.slow
def test_batched_scores_equal_per_row_scores_smollm(smollm):
    assert_batched_equals_alone(smollm)


def test_batched_logits_equal_per_row_logits(tiny):
    # Stronger than p_yes: the whole answer-position logit vector of every row.
    prompts = [build_prompt(tiny.tokenizer, r) for r in mixed_rows(tiny.n_layers, tiny.d_model)]
    pad = tiny.tokenizer.pad_token_id
    with torch.no_grad():
        batched = detection_logits(tiny.model, collate(prompts, pad))
        alone = torch.cat([detection_logits(tiny.model, collate([p], pad)) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_batch_mates_do_not_change_a_rows_score(tiny):
    rows = mixed_rows(tiny.n_layers, tiny.d_model)[:2]
    long_row = example(
        " ".join(["A much longer context that forces a lot of padding on the others."] * 8),
        " ".join(["And a long response as well."] * 6),
        question=QUESTION + " Think about it carefully before answering.",
        steering=Steering(unit(tiny.d_model, 9), 0, tiny.n_layers, 30.0),
    )
    lengths = [len(build_prompt(tiny.tokenizer, r).prefix_ids) for r in [*rows, long_row]]
    assert lengths[2] > 2 * max(lengths[:2])
    pair = score_detection(tiny.model, tiny.tokenizer, rows, batch_size=2)
    triple = score_detection(tiny.model, tiny.tokenizer, [*rows, long_row], batch_size=3)
    assert_scores_match(pair, triple.p_yes[:2], triple.yes_no_mass[:2])


def test_scores_come_back_in_input_order(tiny):
    rows = mixed_rows(tiny.n_layers, tiny.d_model)
    random.Random(0).shuffle(rows)
    p_yes, mass = score_alone(tiny, rows)
    # The rows must be told apart by their scores (gaps over twice the tolerance), or a
    # permutation would go unseen.
    gaps = [abs(a - b) for i, a in enumerate(p_yes) for b in p_yes[i + 1 :]]
    assert min(gaps) > 2e-4
    # batch_size 2 sorts by length into 3 batches, none in the input order.
    assert_scores_match(
        score_detection(tiny.model, tiny.tokenizer, rows, batch_size=2), p_yes, mass
    )


def test_batch_size_below_one_is_rejected(tiny):
    with pytest.raises(IntrospectError, match="batch_size"):
        score_detection(tiny.model, tiny.tokenizer, [example("Hi")], batch_size=0)


# --- the two passes ---------------------------------------------------------------------------


def test_answer_probabilities_by_hand():
    # softmax(log [1, 3, 2, 4]) = [0.1, 0.3, 0.2, 0.4]; pair (1, 2): p_yes = 0.3 / 0.5, mass 0.5.
    logits = torch.tensor([[1.0, 3.0, 2.0, 4.0]]).log() + 7.0
    p_yes, mass = answer_probabilities(logits, torch.tensor([[1, 2]]))
    assert p_yes.item() == pytest.approx(0.6, abs=1e-6)
    assert mass.item() == pytest.approx(0.5, abs=1e-6)


def test_unsteered_two_pass_score_equals_a_plain_full_forward(tiny):
    ex = example("Tell me a fact about the moon.", "The moon has no air.")
    prompt = build_prompt(tiny.tokenizer, ex)
    with torch.no_grad():
        full = tiny.model(torch.tensor([prompt.prefix_ids + prompt.suffix_ids])).logits[:, -1]
    p_yes, mass = answer_probabilities(full, torch.tensor([prompt.answer_ids]))
    scores = score_detection(tiny.model, tiny.tokenizer, [ex])
    assert scores.p_yes[0] == pytest.approx(p_yes.item(), abs=1e-5)
    assert scores.yes_no_mass[0] == pytest.approx(mass.item(), rel=1e-4)


def test_steering_the_prefix_changes_the_answer(tiny):
    s = Steering(unit(tiny.d_model, 1), 0, 2, 50.0)
    ex = example("Tell me about cats.", "Cats are nice.")
    plain, steered = score_detection(
        tiny.model,
        tiny.tokenizer,
        [ex, example(ex.context_prompt, ex.assistant_response, steering=s)],
    ).p_yes
    assert abs(steered - plain) > 1e-2


def test_steering_is_on_for_the_prefix_and_off_for_the_suffix(tiny):
    model, s = tiny.model, Steering(unit(tiny.d_model, 1), 0, 2, 50.0)
    prompt = build_prompt(
        tiny.tokenizer, example("Tell me about cats.", "Cats are nice.", steering=s)
    )
    prefix, suffix = torch.tensor([prompt.prefix_ids]), torch.tensor([prompt.suffix_ids])
    with torch.no_grad():
        library = detection_logits(model, collate([prompt], tiny.tokenizer.pad_token_id))
        with steer(model, s):
            inner = backbone(model)
            cache = output_cache(inner, inner(prefix, use_cache=True))
        steered_prefix_only = model(suffix, **cache_kwargs(model, cache)).logits[:, -1]
        with steer(model, s):
            steered_throughout = model(torch.cat([prefix, suffix], 1)).logits[:, -1]
        unsteered = model(torch.cat([prefix, suffix], 1)).logits[:, -1]
    torch.testing.assert_close(library, steered_prefix_only, atol=1e-4, rtol=0)
    assert (library - steered_throughout).abs().max() > 0.1
    assert (library - unsteered).abs().max() > 0.1


def test_gradients_flow_through_the_suffix_only(tiny):
    s = Steering(unit(tiny.d_model, 1), 0, 2, 5.0)
    prompt = build_prompt(tiny.tokenizer, example("Hi", "Hello.", steering=s))
    batch = collate([prompt], tiny.tokenizer.pad_token_id)
    cache = steered_cache(tiny.model, batch)
    assert all(not layer.keys.requires_grad for layer in cache.layers)
    logits = suffix_logits(tiny.model, batch, cache)
    assert logits.requires_grad
    logits[0, prompt.answer_ids[0]].backward()
    lm_head = tiny.model.get_output_embeddings().weight
    assert lm_head.grad is not None and lm_head.grad.abs().sum() > 0
    tiny.model.zero_grad(set_to_none=True)


# --- prompt construction ----------------------------------------------------------------------


def decoded(tokenizer, prompt) -> tuple[str, str]:
    """The prefix text and the full text the prompt's token ids stand for."""
    return (
        tokenizer.decode(prompt.prefix_ids),
        tokenizer.decode(prompt.prefix_ids + prompt.suffix_ids),
    )


def test_prompt_is_the_chat_template_split_after_the_prefix(tiny):
    tok = tiny.tokenizer
    prefix_msgs = [
        {"role": "user", "content": "Tell me about cats."},
        {"role": "assistant", "content": "Cats are nice."},
    ]
    full_msgs = prefix_msgs + [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "The answer is"},
    ]
    prefix_text = tok.apply_chat_template(prefix_msgs, tokenize=False)
    full_text = tok.apply_chat_template(full_msgs, tokenize=False, continue_final_message=True)
    prompt = build_prompt(tok, example("Tell me about cats.", "Cats are nice."))
    assert prompt.prefix_ids == tok.encode(prefix_text, add_special_tokens=False)
    assert prompt.suffix_ids == tok.encode(full_text[len(prefix_text) :], add_special_tokens=False)
    prefix, full = decoded(tok, prompt)
    assert full.startswith(prefix)
    assert full.endswith("<|im_start|>assistant\nThe answer is")
    assert QUESTION in full[len(prefix) :]


def test_no_system_prompt_uses_the_template_default(tiny):
    prefix, _ = decoded(tiny.tokenizer, build_prompt(tiny.tokenizer, example("Hi")))
    assert prefix.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM)


def test_a_given_system_prompt_replaces_the_default(tiny):
    prompt = build_prompt(tiny.tokenizer, example("Hi", system="You are a pirate."))
    prefix, full = decoded(tiny.tokenizer, prompt)
    assert prefix.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert DEFAULT_SYSTEM not in full


def test_info_prompt_comes_before_the_context_in_the_user_turn(tiny):
    info = "Researchers may inject a thought into your activations."
    prompt = build_prompt(tiny.tokenizer, example("Tell me about cats."), info_prompt=info)
    prefix, full = decoded(tiny.tokenizer, prompt)
    user = prefix.index("<|im_start|>user\n")
    end_of_turn = prefix.index("<|im_end|>", user)
    assert user < prefix.index(info) < prefix.index("Tell me about cats.") < end_of_turn
    assert full.count(info) == 1
    plain_prefix, _ = decoded(
        tiny.tokenizer, build_prompt(tiny.tokenizer, example("Tell me about cats."))
    )
    assert info not in plain_prefix


def test_answer_ids_are_the_single_tokens_of_yes_and_no(tiny):
    tok = tiny.tokenizer
    (yes,), (no,) = (tok.encode(w, add_special_tokens=False) for w in (" yes", " no"))
    assert answer_token_ids(tok) == (yes, no)
    assert build_prompt(tok, example("Hi")).answer_ids == (yes, no)
    assert tok.decode([yes]) == " yes" and yes != no


def test_a_multi_token_answer_is_rejected(tiny):
    with pytest.raises(IntrospectError, match="answer_tokens"):
        answer_token_ids(tiny.tokenizer, (" yesyesyes maybe", " no"))
    ex = example("Hi")
    ex.answer_tokens = (" yes", " yesyesyes maybe")
    with pytest.raises(IntrospectError, match="answer_tokens"):
        build_prompt(tiny.tokenizer, ex)


class StubTokenizer:
    """Character-level ids, single ids for the answers, and a tag-based chat template."""

    pad_token_id = 0
    answers = {" yes": 1, " no": 2}
    header = ""  # a subclass may put something in front that depends on the turns

    def apply_chat_template(self, messages, tokenize=False, continue_final_message=False):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        if continue_final_message:
            text = text.removesuffix(f"</{messages[-1]['role']}>")
        return self.head(messages) + text

    def head(self, messages) -> str:
        return ""

    def encode(self, text, add_special_tokens=True):
        return [self.answers[text]] if text in self.answers else [ord(c) for c in text]


class TurnCountingTokenizer(StubTokenizer):
    """A template that rewrites earlier text when turns are added (it counts them up front)."""

    def head(self, messages) -> str:
        return f"[{len(messages)} turns]"


class ClosingTokenizer(StubTokenizer):
    """A template that ignores continue_final_message and closes the prefilled turn."""

    def apply_chat_template(self, messages, tokenize=False, continue_final_message=False):
        return super().apply_chat_template(messages, tokenize, continue_final_message=False)


def test_a_well_behaved_stub_template_is_accepted():
    prompt = build_prompt(StubTokenizer(), example("Hi", "Hello."))
    text = "".join(map(chr, prompt.prefix_ids + prompt.suffix_ids))
    assert text == f"<user>Hi</user><assistant>Hello.</assistant><user>{QUESTION}</user>" + (
        "<assistant>The answer is"
    )
    assert prompt.answer_ids == (1, 2)


def test_a_template_that_rewrites_earlier_turns_is_rejected():
    with pytest.raises(IntrospectError, match="chat template"):
        build_prompt(TurnCountingTokenizer(), example("Hi", "Hello."))


def test_a_template_that_does_not_end_with_the_prefill_is_rejected():
    with pytest.raises(IntrospectError, match="prefill"):
        build_prompt(ClosingTokenizer(), example("Hi", "Hello."))


def test_mass_is_a_probability(tiny):
    scores = score_detection(tiny.model, tiny.tokenizer, mixed_rows(tiny.n_layers, tiny.d_model))
    assert all(0 < p < 1 for p in scores.p_yes)
    assert all(0 < m <= 1 and math.isfinite(m) for m in scores.yes_no_mass)


def test_identical_unsteered_trials_share_one_score_and_steered_ones_do_not(tiny):
    import dataclasses

    v = torch.zeros(tiny.d_model)
    v[0] = 1.0
    base = DetectionExample("Same context.", "Same reply.", "Same question? Answer yes or no.")
    steered = dataclasses.replace(base, steering=Steering(v, 0, 2, 30.0))
    other = DetectionExample("A different context here.", "Reply.", "Question? Answer yes or no.")
    rows = [base, steered, other, base, steered]
    got = score_detection(tiny.model, tiny.tokenizer, rows, batch_size=2)
    alone = [score_detection(tiny.model, tiny.tokenizer, [r], batch_size=1).p_yes[0] for r in rows]
    assert got.p_yes == pytest.approx(alone, abs=1e-4)
    assert got.p_yes[0] == got.p_yes[3] and got.p_yes[1] != got.p_yes[0]


def test_progress_counts_the_distinct_trials_scored(tiny):
    rows = mixed_rows(tiny.n_layers, tiny.d_model)
    rows = rows + [rows[1]]  # an unsteered duplicate is scored once
    calls = []
    score_detection(
        tiny.model, tiny.tokenizer, rows, batch_size=4, progress=lambda *a: calls.append(a)
    )
    n = len(rows) - 1
    assert calls == [(0, n), (4, n), (n, n)]
    # None (the default) shows nothing and changes nothing.
    assert score_detection(tiny.model, tiny.tokenizer, rows, progress=None).p_yes == pytest.approx(
        score_detection(tiny.model, tiny.tokenizer, rows).p_yes
    )


def test_scoring_passes_the_cache_under_the_name_transformers_expects(tiny):
    """No FutureWarning (transformers >= 5.24 renamed ``past_key_values`` to ``cache``) and no
    deprecation log line: the cache must reach the suffix pass, not fall into ``**kwargs``."""
    import inspect
    import logging
    import warnings

    forward = inspect.signature(type(backbone(tiny.model)).forward).parameters
    expected = "cache" if "cache" in forward else "past_key_values"
    assert cache_kwargs(backbone(tiny.model), None) == {expected: None}

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = mixed_rows(tiny.n_layers, tiny.d_model)
            scores = score_detection(tiny.model, tiny.tokenizer, rows, batch_size=3)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    about_cache = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert about_cache == []
    assert [r for r in records if "past_key_values" in r] == []
    # The cache really was used: equal to reading prefix and suffix as one unsteered sequence.
    plain = example("Name a colour.", "Blue.", system="Be terse.")
    prompt = build_prompt(tiny.tokenizer, plain)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompt.prefix_ids + prompt.suffix_ids])).logits[:, -1]
    p_yes, _ = answer_probabilities(logits, torch.tensor([prompt.answer_ids]))
    assert scores.p_yes[4] == pytest.approx(float(p_yes[0]), abs=1e-5)
