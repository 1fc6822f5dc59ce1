"""The report's control sections on synthetic runs: seed replicates (mean across seeds with a
t interval) and the controls' verdict rows (answer-pair matrix, probe vs B1, input tampering,
side effects paired with the base model). No model is loaded."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report_verdicts import b1_metrics, plan, unit

from introspect.control_verdicts import controls_markdown
from introspect.evals.side_effects import exact_match
from introspect.replicates import replicate_groups, t_interval
from introspect.report import build_report

DATA = {"kind": "data", "vectors": "random", "variant": "original", "n": 100}


def seeded_plan():
    return {
        "d0": DATA | {"seed": 0}, "d1": DATA | {"seed": 1}, "d2": DATA | {"seed": 2},
        "d-rb": DATA | {"seed": 0, "answers": "red-blue"},
        "o0": {"kind": "train", "preset": "original", "data": "d0", "overrides": {"lr": 1e-3}},
        "o1": {"kind": "train", "preset": "original", "data": "d1",
               "overrides": {"lr": 1e-3, "seed": 1}},
        "o2": {"kind": "train", "preset": "original", "data": "d2",
               "overrides": {"lr": 1e-3, "seed": 2}},
        "fast": {"kind": "train", "preset": "original", "data": "d0", "overrides": {"lr": 1e-2}},
        "rb": {"kind": "train", "preset": "original", "data": "d-rb", "overrides": {"lr": 1e-3}},
    }  # fmt: skip


def test_replicates_are_runs_that_differ_only_in_seeds():
    assert replicate_groups({"stages": seeded_plan()}) == [["o0", "o1", "o2"]]


def test_t_interval_is_the_textbook_one():
    x = [0.91, 0.87, 0.95]
    got = t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert got["mean"] == pytest.approx(np.mean(x)) and got["ci"] == pytest.approx([lo, hi])
    assert math.isnan(t_interval([0.9])["ci"][0]) and t_interval([])["n"] == 0


def test_the_report_shows_b1_across_seeds(tmp_path):
    stages = seeded_plan() | {"b1": {"kind": "eval", "suite": "detection",
                                     "models": ["base", "o0", "o1", "o2"]}}  # fmt: skip
    plan(tmp_path, stages)
    accs = {"base": 20, "o0": 36, "o1": 34, "o2": 38}
    for m, k in accs.items():
        unit(tmp_path, "b1", m, b1_metrics(k))
    text = build_report(tmp_path).read_text()
    assert "## B1 across seeds" in text
    mean = np.mean([36 / 40, 34 / 40, 38 / 40])
    lo, hi = stats.t.interval(0.95, 2, loc=mean, scale=stats.sem([0.9, 0.85, 0.95]))
    assert f"{mean:.3f} [{lo:.3f}, {min(hi, 1.0):.3f}]" in text and hi > 1.0  # clipped
    assert "0.900, 0.850, 0.950 (o0, o1, o2)" in text


def test_control_verdict_rows_read_each_suite(tmp_path):
    stages = seeded_plan() | {
        "b1": {"kind": "eval", "suite": "detection", "models": ["base", "o0", "rb"]},
        "b1-rb": {"kind": "eval", "suite": "detection", "models": ["base", "o0", "rb"]},
        "yb": {"kind": "eval", "suite": "yes-bias", "models": ["o0", "rb"]},
        "ic": {"kind": "eval", "suite": "input-control", "models": ["o0"]},
        "se": {"kind": "eval", "suite": "side-effects", "models": ["base", "o0"]},
        "sus": {"kind": "eval", "suite": "susceptibility", "models": ["base", "o0"]},
    }
    plan(tmp_path, stages)
    for m, (yes_no, red_blue) in {"base": (20, 21), "o0": (39, 22), "rb": (24, 38)}.items():
        unit(tmp_path, "b1", m, b1_metrics(yes_no))
        unit(tmp_path, "b1-rb", m, b1_metrics(red_blue) | {"answers": "red-blue"})
    probe = {"auroc": 0.6, "ci": [0.55, 0.65], "n": 100, "features": [], "folds": 5}
    # The row is today's verdict over the stored numbers, not the one stored with them.
    flat = {"delta": {"mean": 0.01, "n": 30, "ci": [-0.02, 0.04]}}
    unit(tmp_path, "yb", "o0", {"verdict": "(an older rule's words)", "n_rows": 100, "excluded": 3,
                                "categories": {"factual_no": flat, "absurd": flat},
                                "logit_probe": probe})  # fmt: skip
    # rb no longer says yes or no: every row under the filter, no probe fitted.
    unit(tmp_path, "yb", "rb", {"verdict": "", "n_rows": 100, "excluded": 100, "categories": {}})
    said = "input tampering not read as steering (...); says steered: clean 0.05; steered 0.95"
    unit(tmp_path, "ic", "o0", {"verdict": said, "n_trials": 10, "excluded": 0,
                                "conditions": {"clean": {}, "steered": {}}})  # fmt: skip
    # Side effects: base right on 3 of 4 questions, o0 on 1 (pairs: 0, -1, -1, 0 ... by key).
    caps = {"base": [" Paris", " 4", " yes", " Rome"], "o0": [" Paris", " 5", " no", " Oslo"]}
    answers = [["Paris"], ["4"], ["yes"], ["Oslo"]]
    for m, said in caps.items():
        d = unit(tmp_path, "se", m, {
            "capability": {"all": {"rate": 0.5, "n": 4, "ci": [0.2, 0.8]}},
            "self_attribution_all": {"p_yes": {"mean": 0.4, "n": 2, "ci": [0.3, 0.5]},
                                     "excluded": 1},
            "min_mass": 0.5})  # fmt: skip
        rows = [{"key": f"k{i}", "response": r, "answers": a, "correct": exact_match(r, a)}
                for i, (r, a) in enumerate(zip(said, answers, strict=True))]  # fmt: skip
        (d / "capability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
        b2 = pd.DataFrame({"key": ["s0", "s1", "s2"], "category": ["self_x"] * 3,
                           "p_yes": [0.2, 0.4, 0.9] if m == "base" else [0.5, 0.6, 0.1],
                           "yes_no_mass": [0.9, 0.9, 0.1]})  # fmt: skip
        b2.to_parquet(d / "behavioral.parquet")
    # Susceptibility: KL per steered trial, paired by key (o0 moves less: -0.2 on average).
    rate = {"rate": 0.0, "successes": 0, "n": 2, "ci": [0.0, 0.66]}
    for m, kls in {"base": [0.9, 0.5], "o0": [0.6, 0.4]}.items():
        overall = {"n": 2, "keyword_steered": rate, "keyword_control": rate}
        kl = {"mean": sum(kls) / 2, "n": 2, "ci": [0.1, 0.9]}
        d = unit(tmp_path, "sus", m, {"overall": overall, "kl": kl})
        results = pd.DataFrame({"key": ["b", "a", "a0", "b0"], "kl": [kls[1], kls[0], None, None],
                                "steered": [True, True, False, False]})  # fmt: skip
        results.to_parquet(d / "results.parquet")
    dirs = {n: tmp_path / n / "h1" for n in stages if (tmp_path / n).exists()}
    text = controls_markdown({"stages": stages}, dirs)
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in text.splitlines()}
    assert ("answer pair", "rb", "detection holds") in lines  # trained and asked red-blue
    assert ("answer pair", "o0", "does not transfer") in lines  # 22/40 is not above chance
    assert ("answer pair", "rb", "does not transfer") in lines
    assert ("answer pair", "o0", "detection holds") in lines
    assert ("logit-shift probe", "o0", "detection exceeds the logit shift") in lines
    assert ("yes-bias", "o0", "no yes-shift") in lines
    assert ("yes-bias", "rb", "not measurable") in lines
    assert ("logit-shift probe", "rb", "not measurable") in lines
    assert ("input tampering", "o0", "input tampering not read as steering (...)") in lines
    side = lines[("side effects", "o0", "no capability loss shown")]
    # Paired by key: (1-1) + (0-1) + (0-1) + (1-0) over 4 = -0.25; self rows kept in both: s0, s1.
    assert "Δ exact match vs base -0.250" in side
    assert "Δ self P(yes) vs base +0.250" in side and "n = 2 kept in both" in side
    # Paired by key: a 0.6 - 0.9, b 0.4 - 0.5; the bootstrap interval [-0.3, -0.1] is below 0.
    sus = lines[("susceptibility", "o0", "less susceptible than base")]
    assert "Δ KL vs base -0.200 [-0.300, -0.100]" in sus
    assert "| rb (red-blue) |" in text and "| o0 (yes-no) |" in text  # the matrix
