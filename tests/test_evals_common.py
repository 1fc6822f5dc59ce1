"""Shared eval pieces: config checking, generation (seeded, batch-independent, steered like the
two-pass protocol), multi-way scoring."""

from dataclasses import dataclass

import pytest
import torch

from introspect.detection import DetectionExample, build_prompt, collate, detection_logits
from introspect.errors import IntrospectError
from introspect.evals.common import chat_ids, parse_config, question_prompt, score_choices
from introspect.evals.generation import Sampling, generate, prefill
from introspect.steering import Steering
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals


@dataclass
class Cfg:
    model: str = "m"
    n: int = 2
    factors: list[float] | None = None
    name: str | None = None


def test_parse_config_names_the_bad_field_and_applies_full():
    assert parse_config(Cfg, {"n": 3}).n == 3
    assert parse_config(Cfg, {"full": True}, {"n": 50}).n == 50
    assert parse_config(Cfg, {"full": True, "n": 7}, {"n": 50}).n == 7
    assert parse_config(Cfg, {"factors": [1, 0.5]}).factors == [1, 0.5]
    with pytest.raises(IntrospectError, match="^nn: unknown option"):
        parse_config(Cfg, {"nn": 3})
    with pytest.raises(IntrospectError, match="^n: 'x' is not a valid int"):
        parse_config(Cfg, {"n": "x"})
    with pytest.raises(IntrospectError, match="^factors:"):
        parse_config(Cfg, {"factors": ["a"]})
    with pytest.raises(IntrospectError, match="^n:"):
        parse_config(Cfg, {"n": True})


def test_greedy_generation_matches_transformers_generate(tiny):
    prompts = [chat_ids(tiny.tokenizer, [{"role": "user", "content": q}]) for q in ("Hi", "Why?")]
    ours = generate(tiny, prompts, Sampling(max_new_tokens=6))
    for p, text in zip(prompts, ours, strict=True):
        ref = tiny.model.generate(
            torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert text == tiny.tokenizer.decode(ref[0, len(p) :], skip_special_tokens=True)


def test_sampling_is_seeded_per_row_and_independent_of_batch_mates(tiny):
    tok = tiny.tokenizer
    a = chat_ids(tok, [{"role": "user", "content": "Tell me a story."}])
    b = chat_ids(tok, [{"role": "user", "content": "A much longer question about many things?"}])
    s = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9)
    alone = generate(tiny, [a], s, seeds=[5])
    mixed = generate(tiny, [b, a, b], s, seeds=[1, 5, 2])
    assert mixed[1] == alone[0]
    assert generate(tiny, [a, a], s, seeds=[5, 6]) != [alone[0], alone[0]]


def test_steered_prefill_equals_the_two_pass_protocol(tiny):
    """Steering the prefix positions in one pass = steer the prefix, remove, read the suffix."""
    v = random_vectors(tiny.d_model, 1, 0)[0]
    ex = DetectionExample("Some context here.", "A reply.", "Was anything injected?")
    prompt = build_prompt(tiny.tokenizer, ex)
    n = len(prompt.prefix_ids)
    steering = Steering(v, 1, 3, 8.0)
    prompt.steering = steering
    two_pass = detection_logits(tiny.model, collate([prompt], 0))
    one_pass_steering = Steering(v, 1, 3, 8.0, positions=(0, n))
    short = chat_ids(tiny.tokenizer, [{"role": "user", "content": "x"}])
    with torch.no_grad():
        _, logits, _, _ = prefill(
            tiny, [prompt.prefix_ids + prompt.suffix_ids, short], [one_pass_steering, None], 0
        )
    torch.testing.assert_close(logits[0], two_pass[0], atol=1e-4, rtol=1e-4)


def test_score_choices_handles_mixed_answer_counts(tiny):
    tok = tiny.tokenizer
    two = question_prompt(tok, "Is it?", (" yes", " no"))
    three = question_prompt(tok, "Which?", (" early", " middle", " late"))
    probs, mass = score_choices(tiny, [two, three, two])
    assert [len(p) for p in probs] == [2, 3, 2]
    assert probs[0] == pytest.approx(probs[2], abs=1e-5)
    for p in probs:
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
    assert all(0 < m < 1 for m in mass)
    text = tok.decode(two.prefix_ids + two.suffix_ids)
    assert text.endswith("The answer is") and "Is it?" in tok.decode(two.prefix_ids)
