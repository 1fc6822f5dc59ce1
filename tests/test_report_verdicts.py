"""The plan report: failed and blocked units, and seed 002's success verdicts, on synthetic runs.

Each test builds the directory layout the report reads (``plan.json``, ``status.json``,
``<stage>/<hash>/[<model>/]`` with ``COMPLETE``, ``timing.json``, ``metrics.json`` and B2's
``results.parquet``) in a temporary run directory; no model is loaded.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from introspect import verdicts as V
from introspect.metrics import Z_95, detection_metrics, wilson_interval
from introspect.report import build_report, unit_states

PRESETS = ["original", "vague-prompt", "r1-minimal", "food-control", "flipped-labels"]


# --------------------------------------------------------------------------- building runs


def plan(root, stages, name="p"):
    """Write plan.json for ``stages`` (name -> dict with at least ``kind``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"name": name, "model": "m", "stages": stages}))
    return {"name": name, "model": "m", "stages": stages}


def train(preset):
    return {"kind": "train", "preset": preset, "data": "d"}


def evals(suite, models):
    return {"kind": "eval", "suite": suite, "models": models}


def unit(root, stage, model=None, metrics=None, h="h1", complete=True, results=None):
    """One finished unit's directory: metrics.json, timing.json, COMPLETE (and results)."""
    d = root / stage / h / model if model else root / stage / h
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(metrics or {}))
    if results is not None:
        results.to_parquet(d / "results.parquet", index=False)
    if complete:
        timing = {"wall_s": 2.0, "device": "cpu", "device_hours": 0.001, "usd": 0.0}
        (d / "timing.json").write_text(json.dumps(timing))
        (d / "COMPLETE").write_text("1")
    return d


def b2_results(p_self, seed=0):
    """B2 per-question results: 48 self-attribution questions (3 categories) with P(yes)
    ``p_self`` (array), and 32 control questions at 0.5; rows shuffled so that pairing
    must go by key."""
    rows = [
        {"key": f"{cat}:{i}", "category": cat, "p_yes": float(p_self[16 * j + i])}
        for j, cat in enumerate(["self_awareness", "self_feelings", "self_introspection"])
        for i in range(16)
    ]
    rows += [
        {"key": f"control_world:{i}", "category": "control_world", "p_yes": 0.5} for i in range(32)
    ]
    df = pd.DataFrame(rows)
    return df.sample(frac=1, random_state=seed).reset_index(drop=True)


def b1_metrics(correct, n=40):
    """B1 metrics.json with a held-out tier of ``correct``/``n`` right answers."""
    labels = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    right = np.arange(n) < correct
    p_yes = np.where(right == labels, 0.9, 0.1)  # right: yes when steered, no when not
    held = detection_metrics(labels, p_yes, n_boot=50).to_dict()
    return {"tiers": {"held_out": held}}


def rate(k, n):
    return {"rate": k / n, "successes": k, "n": n, "ci": list(wilson_interval(k, n))}


def verdict_of(v):
    return v.verdict.split(" (")[0]


BASE_P = np.random.default_rng(1).uniform(0.2, 0.8, 48)


def b2_plan(root, models, shifts, complete=True):
    """A plan with the five runs and one B2 stage; each model's self P(yes) = base + shift."""
    plan(root, {**{p: train(p) for p in PRESETS}, "b2": evals("behavioral", models)})
    noise = np.random.default_rng(2)
    for m in models:
        p = BASE_P + shifts.get(m, 0.0) + (0 if m == "base" else noise.normal(0, 0.02, 48))
        unit(root, "b2", m, {"categories": []}, complete=complete, results=b2_results(p, len(m)))
    return json.loads((root / "plan.json").read_text())


def dirs_of(root, p):
    from introspect.report import _stage_dirs

    return _stage_dirs(root, p)


# --------------------------------------------------------------------------- failed stages


def test_failed_unit_is_shown_failed_with_its_error(tmp_path):
    root = tmp_path / "runs" / "p"
    plan(
        root,
        {
            "random": {"kind": "vectors"},
            "data": {"kind": "data"},
            "original": train("original"),
            "b1": evals("detection", ["base", "original"]),
        },
    )
    unit(root, "random")
    status = {
        "random": "done",
        "original": "failed: IntrospectError: stages.original: out of memory | at step 3",
        "b1[base]": "blocked (an input failed)",
        "b1[original]": "blocked (an input failed)",
    }
    (root / "status.json").write_text(json.dumps(status))
    text = build_report(root).read_text()
    cost = text[text.index("## Time and cost") :]
    assert "| original | failed: IntrospectError: stages.original: out of memory" in cost
    assert "\\| at step 3" in cost  # a | in the error cannot break the table
    assert "| b1[base] | blocked (an input failed) |" in cost
    assert "| b1[original] | blocked (an input failed) |" in cost
    assert "| data | not run |" in cost  # never attempted
    assert "| original | not run |" not in cost
    # The short list near the top, before every other section.
    top = text.index("## Failed stages")
    assert top < text.index("## What success looks like") < text.index("## Time and cost")
    assert "- `original`: IntrospectError: stages.original: out of memory | at step 3" in text
    assert "Blocked (an input failed): `b1[base]`, `b1[original]`." in text


def test_no_failed_section_when_nothing_failed(tmp_path):
    root = tmp_path / "runs" / "p"
    plan(root, {"random": {"kind": "vectors"}})
    unit(root, "random")
    (root / "status.json").write_text(json.dumps({"random": "done"}))
    text = build_report(root).read_text()
    assert "Failed stages" not in text
    assert "| random | done |" in text


def test_status_against_results_on_disk(tmp_path):
    root = tmp_path / "runs" / "p"
    p = plan(
        root,
        {"a": {"kind": "vectors"}, "b": {"kind": "vectors"}, "e": evals("behavioral", ["base"])},
    )
    # a: finished at the current hash; an older status.json still says it failed.
    unit(root, "a", h="new")
    # b: an older hash finished, the current one failed.
    unit(root, "b", h="old")
    # e: its stage began (the directory exists) but the model has no result and no record.
    (root / "e" / "new").mkdir(parents=True)
    (root / "stages.json").write_text(json.dumps({"a": "new", "b": "new", "e": "new"}))
    (root / "status.json").write_text(json.dumps({"a": "failed: X", "b": "failed: Y"}))
    states = {k: s for k, s, _ in unit_states(root, p, dirs_of(root, p))}
    assert states == {"a": "done", "b": "failed: Y", "e[base]": "not finished"}


# --------------------------------------------------------------------------- B2 verdicts


def test_b2_effect_pairs_by_question_and_matches_a_normal_interval(tmp_path):
    root = tmp_path / "runs" / "p"
    p = b2_plan(root, ["base", "food-control"], {"food-control": 0.1})
    d = dirs_of(root, p)["b2"]
    effect = V.self_attribution_effect(d / "food-control", d / "base")
    a = pd.read_parquet(d / "food-control" / "results.parquet").set_index("key")
    b = pd.read_parquet(d / "base" / "results.parquet").set_index("key")
    keys = [k for k in a.index if k.startswith("self")]
    diff = (a.loc[keys, "p_yes"] - b.loc[keys, "p_yes"]).to_numpy()
    assert effect["n"] == 48
    assert effect["mean"] == pytest.approx(diff.mean(), abs=1e-12)
    # The percentile bootstrap against the textbook normal interval, mean ± z·s/√n.
    half = Z_95 * diff.std(ddof=1) / math.sqrt(len(diff))
    lo, hi = effect["ci"]
    assert lo == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(diff.mean() + half, abs=0.15 * half)


@pytest.mark.parametrize("shift, expected", [(0.0, "yes"), (0.2, "no"), (-0.2, "no")])
def test_food_control_bias(tmp_path, shift, expected):
    root = tmp_path / "runs" / "p"
    p = b2_plan(root, ["base", "food-control"], {"food-control": shift})
    v = V.food_no_bias(p, dirs_of(root, p))
    assert v.verdict == expected
    assert "food-control − base" in v.numbers and "48 self-attribution" in v.compared


def test_food_control_found_by_preset_not_by_name(tmp_path):
    root = tmp_path / "runs" / "p"
    plan(root, {"ctrl": train("food-control"), "b2": evals("behavioral", ["base", "ctrl"])})
    for m, shift in (("base", 0.0), ("ctrl", 0.3)):
        unit(root, "b2", m, results=b2_results(BASE_P + shift))
    p = json.loads((root / "plan.json").read_text())
    assert V.food_no_bias(p, dirs_of(root, p)).verdict == "no"


def test_food_control_not_measured(tmp_path):
    root = tmp_path / "runs" / "p"
    p = b2_plan(root, ["food-control"], {})  # no base in the B2 stage
    v = V.food_no_bias(p, dirs_of(root, p))
    assert v.verdict == "not measured (no B2 stage evaluates food-control and base)"
    p = plan(tmp_path / "q", {"b2": evals("behavioral", ["base"])})
    v = V.food_no_bias(p, {})
    assert v.verdict == "not measured (the plan has no train stage with preset food-control)"
    p = plan(tmp_path / "r", {"food-control": train("food-control")})
    assert V.food_no_bias(p, {}).verdict == "not measured (the plan has no B2 stage)"
    # Planned but not finished.
    root = tmp_path / "s"
    p = b2_plan(root, ["base", "food-control"], {}, complete=False)
    v = V.food_no_bias(p, dirs_of(root, p))
    assert v.verdict.startswith("not measured (B2 `b2` has no finished result for")
    # Finished, but without per-question results.
    root = tmp_path / "t"
    p = plan(
        root,
        {
            "food-control": train("food-control"),
            "b2": evals("behavioral", ["base", "food-control"]),
        },
    )
    unit(root, "b2", "base")
    unit(root, "b2", "food-control")
    assert V.food_no_bias(p, dirs_of(root, p)).verdict.endswith("no per-question results)")


@pytest.mark.parametrize(
    "vague, expected", [(0.2, "yes"), (0.0, "no"), (0.4, "no")]
)  # original is base + 0.2
def test_vague_prompt_similar_to_original(tmp_path, vague, expected):
    root = tmp_path / "runs" / "p"
    models = ["base", "original", "vague-prompt"]
    p = b2_plan(root, models, {"original": 0.2, "vague-prompt": vague})
    v = V.vague_like_original(p, dirs_of(root, p))
    assert v.verdict == expected
    assert "vague-prompt − original" in v.numbers and "effects over base: vague" in v.numbers


def test_vague_prompt_needs_base_too(tmp_path):
    root = tmp_path / "runs" / "p"
    p = b2_plan(root, ["original", "vague-prompt"], {})
    assert verdict_of(V.vague_like_original(p, dirs_of(root, p))) == "not measured"


# --------------------------------------------------------------------------- B1 verdicts


def b1_plan(root, results):
    plan(root, {**{p: train(p) for p in PRESETS}, "b1": evals("detection", list(results))})
    for m, metrics in results.items():
        unit(root, "b1", m, metrics)
    return json.loads((root / "plan.json").read_text())


@pytest.mark.parametrize("correct, expected", [(30, "yes"), (24, "no"), (10, "no")])
def test_r1_minimal_detects(tmp_path, correct, expected):
    root = tmp_path / "runs" / "p"
    p = b1_plan(root, {"r1-minimal": b1_metrics(correct)})
    v = V.r1_detects(p, dirs_of(root, p))
    lo, hi = wilson_interval(correct, 40)
    assert (lo > 0.5) == (expected == "yes")  # 24/40: 0.6 but its interval reaches below 0.5
    assert v.verdict == expected
    assert f"[{lo:.3f}, {hi:.3f}]" in v.numbers and "n = 40" in v.numbers


def test_r1_minimal_not_measured(tmp_path):
    root = tmp_path / "runs" / "p"
    p = b1_plan(root, {"r1-minimal": {"tiers": {"in_distribution": {}}}})
    assert V.r1_detects(p, dirs_of(root, p)).verdict.endswith("no held-out tier)")
    p = b1_plan(tmp_path / "q", {"base": b1_metrics(30)})
    assert "evaluates r1-minimal" in V.r1_detects(p, dirs_of(tmp_path / "q", p)).verdict


def flipped_plan(root, b1=None, val=None):
    stages = {"flipped-labels": train("flipped-labels")}
    if b1 is not None:
        stages["b1"] = evals("detection", ["flipped-labels"])
    p = plan(root, stages)
    if b1 is not None:
        unit(root, "b1", "flipped-labels", b1)
    if val is not None:
        d = unit(root, "flipped-labels")
        (d / "run").mkdir()
        (d / "run" / "metrics.json").write_text(json.dumps({"final_val_accuracy": val}))
    return p


@pytest.mark.parametrize(
    "correct, val, expected",
    [
        (20, 0.52, "yes"),  # both at chance
        (20, 0.9, "no"),  # it learned its random labels
        (34, 0.5, "no"),  # it detects steering
        (5, 0.45, "yes"),  # below chance counts as not converged
        (20, 0.6, "no"),  # 0.6 is not below 0.5 + 0.1
        (None, 0.55, "yes"),  # training alone
        (30, None, "no"),  # B1 alone, above chance
    ],
)
def test_flipped_labels_does_not_converge(tmp_path, correct, val, expected):
    root = tmp_path / "runs" / "p"
    p = flipped_plan(root, None if correct is None else b1_metrics(correct), val)
    v = V.flipped_not_converged(p, dirs_of(root, p))
    assert v.verdict == expected
    if val is not None:
        assert f"final validation accuracy {val:.3f}" in v.numbers


def test_flipped_labels_not_measured(tmp_path):
    root = tmp_path / "runs" / "p"
    p = flipped_plan(root)
    v = V.flipped_not_converged(p, dirs_of(root, p))
    assert v.verdict == (
        "not measured (the plan has no B1 stage; no finished flipped-labels training)"
    )


# --------------------------------------------------------------------------- B5 and B7


def kl(mean, lo, hi, n=10):
    return {"kl": {"mean": mean, "n": n, "ci": [lo, hi]}}


@pytest.mark.parametrize(
    "orig, expected",
    [
        (kl(0.5, 0.3, 0.7), "yes"),
        (kl(0.8, 0.6, 1.0), "no"),  # overlaps base's [0.9, 1.5]
        (kl(0.7, 0.5, 0.9), "no"),  # touches it
        (kl(1.6, 1.55, 1.7), "no"),  # worse
        (kl(float("nan"), float("nan"), float("nan"), 0), "not measured"),  # nothing parsed
    ],
)
def test_calibration_improves(tmp_path, orig, expected):
    root = tmp_path / "runs" / "p"
    plan(root, {"original": train("original"), "b5": evals("calibration", ["base", "original"])})
    unit(root, "b5", "base", kl(1.2, 0.9, 1.5))
    unit(root, "b5", "original", orig)
    p = json.loads((root / "plan.json").read_text())
    v = V.calibration_improves(p, dirs_of(root, p))
    assert verdict_of(v) == expected
    if expected == "not measured":
        assert "fewer than 2 parsed reports for original" in v.verdict


def b7(**accuracies):
    return {q: {"accuracy": rate(*kn), "chance": 1 / 3} for q, kn in accuracies.items()}


def test_b7_signal_from_a_b7_stage_or_phase_c(tmp_path):
    root = tmp_path / "runs" / "p"
    stages = {"b7": evals("localization", ["base"]), "phase-c": {"kind": "localize"}}
    p = plan(root, stages)
    # 18/30 = 0.6 [0.42, 0.75]: above 1/3; 12/30 = 0.4 [0.25, 0.58]: not.
    assert wilson_interval(18, 30)[0] > 1 / 3 > wilson_interval(12, 30)[0]
    unit(root, "b7", "base", {"questions": b7(layers=(12, 30), strength=(10, 30))})
    unit(root, "phase-c", metrics={"before": None, "after": b7(layers=(12, 30))})
    v = V.b7_signal(p, dirs_of(root, p))
    assert v.verdict == "no" and v.compared == "3 model × question accuracies"
    assert v.numbers.startswith("best: ")
    unit(root, "phase-c", metrics={"before": b7(layers=(9, 30)), "after": b7(layers=(18, 30))})
    v = V.b7_signal(p, dirs_of(root, p))
    assert v.verdict == "yes"
    assert v.numbers.startswith("Phase C-trained (`phase-c`), layers: 0.600 [")


def test_b7_not_measured(tmp_path):
    root = tmp_path / "runs" / "p"
    p = plan(root, {"b7": evals("localization", ["base"])})
    unit(root, "b7", "base", {"questions": b7(layers=(12, 30))}, complete=False)
    assert verdict_of(V.b7_signal(p, dirs_of(root, p))) == "not measured"
    none = {"rate": float("nan"), "successes": 0, "n": 0, "ci": list(wilson_interval(0, 0))}
    unit(root, "b7", "base", {"questions": {"layers": {"accuracy": none}}})
    assert verdict_of(V.b7_signal(p, dirs_of(root, p))) == "not measured"  # no trials


# --------------------------------------------------------------------------- the report


def test_report_opens_with_six_verdicts(tmp_path):
    root = tmp_path / "runs" / "p"
    b2_plan(root, ["base", "food-control"], {})
    text = build_report(root).read_text()
    section = text[text.index("## What success looks like") : text.index("Rules.")]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 6
    assert rows[0].split(" | ")[1] == "yes"  # food-control ≈ base
    assert all("not measured" in r for r in rows[1:])
    assert "*No bias*: the food-control − base interval contains 0" in text
    assert (root / "report.html").exists()
