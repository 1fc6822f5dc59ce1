"""Shared eval pieces: config checking, generation (seeded, batch-independent, steered like the
two-pass protocol), multi-way scoring, intervals."""

import numpy as np
import pytest
import torch

from introspect.config import parse
from introspect.detection import DetectionExample, build_prompt, collate, detection_logits
from introspect.errors import IntrospectError
from introspect.evals.behavioral import BehavioralConfig
from introspect.evals.calibration import CalibrationConfig
from introspect.evals.common import chat_ids, mean_ci, question_prompt, rate, score_choices
from introspect.evals.concepts import ConceptsConfig
from introspect.evals.detection import DetectionEvalConfig
from introspect.evals.generation import Sampling, generate, prefill
from introspect.evals.identity import IdentityConfig
from introspect.evals.localization import LocalizationConfig
from introspect.evals.self_prediction import SelfPredictionConfig
from introspect.localize_train import LocalizeTrainConfig
from introspect.steering import Steering
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals

# (config, required options, an int field, an out-of-range value of some field)
SUITES = [
    (DetectionEvalConfig, {"vectors": "random.safetensors"}, "n_per_tier", ("magnitudes", [0.0])),
    (BehavioralConfig, {}, "batch_size", ("batch_size", 0)),
    (IdentityConfig, {}, "n_samples", ("top_p", 1.5)),
    (SelfPredictionConfig, {}, "n_per_task", ("n_per_task", 0)),
    (CalibrationConfig, {}, "k", ("epsilon", 0.0)),
    (ConceptsConfig, {}, "n_concepts", ("magnitudes", [-1.0])),
    (LocalizationConfig, {}, "n_per_question", ("strength_factors", [1.0, 2.0])),
    (LocalizeTrainConfig, {}, "n_train", ("n_val", 0)),
    (Sampling, {}, "max_new_tokens", ("top_p", 0.0)),
]


@pytest.mark.parametrize("cls, base, int_field, bad", SUITES, ids=[s[0].__name__ for s in SUITES])
def test_suite_configs_refuse_bad_options_naming_the_field(cls, base, int_field, bad):
    where = "stages.x.options"
    assert isinstance(parse(cls, base, where), cls)
    cases = {
        int_field: {int_field: "many"},  # wrong type
        "no_such_option": {"no_such_option": 1},  # unknown key
        bad[0]: {bad[0]: bad[1]},  # out of range
    }
    for field, options in cases.items():
        with pytest.raises(IntrospectError) as e:
            parse(cls, {**base, **options}, where)
        assert str(e.value).startswith(f"{where}.{field}"), str(e.value)
    with pytest.raises(IntrospectError, match=rf"^{where}\.{int_field}: 1\.5"):
        parse(cls, {**base, int_field: 1.5}, where)


def test_full_sizes_apply_and_explicit_options_win():
    assert parse(IdentityConfig, {}).n_samples == 2
    assert parse(IdentityConfig, {"full": True}).n_samples == 5
    assert parse(IdentityConfig, {"full": True, "n_samples": 7}).n_samples == 7
    assert parse(CalibrationConfig, {"full": True}).n_prompts is None
    with pytest.raises(IntrospectError, match="^full: 'yes'"):
        parse(IdentityConfig, {"full": "yes"})
    with pytest.raises(IntrospectError, match="^full: unknown key"):
        parse(BehavioralConfig, {"full": True})  # B2 has no real-run sizes


def test_detection_magnitudes_are_the_data_definition():
    cfg = parse(DetectionEvalConfig, {"vectors": "v"})
    assert (cfg.magnitude_mode, cfg.magnitudes) == ("relative", [0.05, 0.1, 0.2, 0.3])
    cfg = parse(DetectionEvalConfig, {"vectors": "v", "magnitude_mode": "absolute"})
    assert cfg.magnitudes == [5.0, 10.0, 20.0, 30.0]
    with pytest.raises(IntrospectError, match="^vectors: required"):
        parse(DetectionEvalConfig, {})


def test_phase_c_checks_its_training_overrides_and_questions():
    where = "stages.phase-c.config"
    with pytest.raises(IntrospectError, match=rf"^{where}\.train\.lr: 'x'"):
        parse(LocalizeTrainConfig, {"train": {"lr": "x"}}, where)
    with pytest.raises(IntrospectError, match=rf"^{where}\.train\.lrr: unknown key"):
        parse(LocalizeTrainConfig, {"train": {"lrr": 1e-3}}, where)
    with pytest.raises(IntrospectError, match=rf"^{where}\.questions\.0: .*'layers'"):
        parse(LocalizeTrainConfig, {"questions": ["layer"]}, where)
    cfg = parse(LocalizeTrainConfig, {"train": {"lr": 1e-3}, "seed": 3})
    assert cfg.train == {"lr": 1e-3}  # a plain dict of what was given
    train = cfg.train_config()
    assert (train.lr, train.seed, train.warmup_steps) == (1e-3, 3, 10)


def test_rate_and_mean_ci():
    from introspect.metrics import wilson_interval

    r = rate(3, 10)
    assert r == {"rate": 0.3, "successes": 3, "n": 10, "ci": list(wilson_interval(3, 10))}
    x = np.random.default_rng(1).normal(size=25)
    m = mean_ci(x.tolist(), n_boot=500, seed=4)
    # the plain percentile bootstrap of the items, draw for draw
    draws = x[np.random.default_rng(4).integers(0, 25, size=(500, 25))].mean(1)
    assert m["ci"] == pytest.approx(np.quantile(draws, [0.025, 0.975]).tolist())
    assert m["mean"] == pytest.approx(x.mean()) and m["n"] == 25
    assert mean_ci([0.5])["n"] == 1 and np.isnan(mean_ci([])["mean"])


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
