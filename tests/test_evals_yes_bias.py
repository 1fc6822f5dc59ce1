"""Yes-bias control: the question file, twinned trials, the metrics against a hand computation,
the mass filter, the stage files, and the plan and CLI errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from introspect.evals.behavioral import behavioral_trials
from introspect.evals.common import read_resource
from introspect.evals.yes_bias import (
    ASK,
    run_yes_bias,
    yes_bias_metrics,
    yes_bias_trials,
)
from introspect.vectors import VectorSet, save_vectors
from pipelines.plan import parse_plan

pytestmark = pytest.mark.evals


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The textbook Wilson score interval, written out here independently of the package."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_question_file_has_30_or_more_of_each_kind_with_answers():
    q = behavioral_trials(read_resource("yes_bias.json"))
    counts = q["category"].value_counts()
    assert set(counts.index) == {"factual_yes", "factual_no", "absurd"}
    assert (counts >= 30).all() and q["question"].is_unique
    assert (q.loc[q["category"] == "factual_yes", "truth"] == "yes").all()
    assert (q.loc[q["category"] != "factual_yes", "truth"] == "no").all()


def test_trials_are_twins_on_held_out_vectors():
    vs = VectorSet(torch.randn(10, 64), "tiny-random", "random", n_train=6, name="random")
    questions = behavioral_trials(read_resource("yes_bias.json"))
    mags = {r: [1.0, 2.0] for r in [(0, 1), (1, 2), (2, 3)]}
    t = yes_bias_trials(vs, 4, questions, 3, mags, seed=5)
    assert len(t) == 2 * 3 * len(questions) and t["key"].is_unique
    for _, pair in t.groupby("pair"):
        s, u = pair[pair["steered"]].iloc[0], pair[~pair["steered"]].iloc[0]
        assert len(pair) == 2
        texts = ["context_prompt", "assistant_response", "detection_question", "question_key"]
        assert (s[texts] == u[texts]).all()
        assert s["vector_idx"] >= 6 and pd.isna(u["vector_idx"])
        assert s["detection_question"].endswith(ASK)
    # The same seed draws the same trials; another seed others.
    pd.testing.assert_frame_equal(t, yes_bias_trials(vs, 4, questions, 3, mags, seed=5))
    assert not t.equals(yes_bias_trials(vs, 4, questions, 3, mags, seed=6))


def scores_table() -> pd.DataFrame:
    """Five pairs by hand: (category, truth, layer range, p_yes steered, p_yes unsteered,
    mass steered, mass unsteered)."""
    pairs = [
        ("absurd", "no", (0, 2), 0.70, 0.20, 0.9, 0.9),
        ("absurd", "no", (2, 4), 0.60, 0.30, 0.9, 0.8),
        ("absurd", "no", (0, 2), 0.90, 0.10, 0.3, 0.9),  # steered row under the mass: excluded
        ("factual_yes", "yes", (0, 2), 0.80, 0.90, 0.7, 0.7),
        ("factual_yes", "yes", (2, 4), 0.40, 0.70, 0.6, 0.6),
    ]
    rows = []
    for i, (cat, truth, (a, b), ps, pu, ms, mu) in enumerate(pairs):
        for steered, p, m in ((True, ps, ms), (False, pu, mu)):
            rows.append({"pair": i, "category": cat, "truth": truth, "layer_start": a,
                         "layer_end": b, "steered": steered, "p_yes": p,
                         "yes_no_mass": m})  # fmt: skip
    return pd.DataFrame(rows)


def test_metrics_equal_a_hand_computation():
    m = yes_bias_metrics(scores_table(), min_mass=0.5, n_layers=5)
    absurd, fact = m["categories"]["absurd"], m["categories"]["factual_yes"]
    # The mass filter: one steered absurd row out; its pair leaves the paired change.
    assert m["excluded"] == 1 and absurd["excluded"] == {"unsteered": 0, "steered": 1}
    assert absurd["n_pairs"] == 2 and fact["n_pairs"] == 2
    assert absurd["delta"]["mean"] == pytest.approx(((0.7 - 0.2) + (0.6 - 0.3)) / 2)
    assert fact["delta"]["mean"] == pytest.approx(((0.8 - 0.9) + (0.4 - 0.7)) / 2)
    # Kept rows only: the unsteered twin of the excluded row stays in the unsteered mean.
    assert absurd["unsteered"]["p_yes"]["mean"] == pytest.approx((0.2 + 0.3 + 0.1) / 3)
    assert absurd["steered"]["p_yes"]["mean"] == pytest.approx((0.7 + 0.6) / 2)
    # Says yes / correct, against the truth, with Wilson intervals from the textbook formula.
    assert absurd["steered"]["says_yes"]["successes"] == 2
    assert absurd["steered"]["correct"]["successes"] == 0
    assert fact["steered"]["correct"]["successes"] == 1 and fact["steered"]["correct"]["n"] == 2
    assert fact["steered"]["correct"]["ci"] == pytest.approx(wilson(1, 2))
    assert absurd["unsteered"]["correct"]["ci"] == pytest.approx(wilson(3, 3))
    # By layer range: the four kept pairs, two in each range, each range's own deltas.
    assert sorted(v["n_pairs"] for v in m["layers"].values()) == [2, 2]
    assert sorted(v["delta"]["mean"] for v in m["layers"].values()) == pytest.approx(
        [((0.6 - 0.3) + (0.4 - 0.7)) / 2, ((0.7 - 0.2) + (0.8 - 0.9)) / 2]
    )
    assert m["overall"]["delta"]["mean"] == pytest.approx(np.mean([0.5, 0.3, -0.1, -0.3]))


def test_the_verdict_calls_a_shift_only_when_its_interval_is_above_zero():
    t = scores_table()
    m = yes_bias_metrics(t, min_mass=0.5, n_layers=5)
    # Two absurd pairs, both up: the bootstrap interval of {0.5, 0.3} is [0.3, 0.5] > 0.
    assert m["verdict"].startswith("yes-shift") and "absurd" in m["verdict"]
    flat = t.copy()
    flat.loc[flat["category"] == "absurd", "p_yes"] = [0.5, 0.5, 0.4, 0.6, 0.5, 0.5]
    m = yes_bias_metrics(flat, min_mass=0.5, n_layers=5)
    assert m["verdict"].startswith("no yes-shift")
    # With no mass filter, every row counts.
    assert yes_bias_metrics(t, min_mass=0.0, n_layers=5)["excluded"] == 0
    # A model that no longer says yes or no: every row under the filter, nothing to call.
    gone = yes_bias_metrics(t.assign(yes_no_mass=0.01), min_mass=0.5, n_layers=5)
    assert gone["verdict"].startswith("not measurable") and gone["excluded"] == len(t)


def test_the_stage_writes_its_files_and_its_scores_are_the_batched_path(tiny, tmp_path):
    unit = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    save_vectors(tmp_path / "v.safetensors", VectorSet(unit, "tiny-random", "random", 4))
    data = {"categories": {"factual_yes": ["Is ice cold?"], "absurd": ["Is Tuesday blue?"]},
            "truth": {"factual_yes": ["yes"], "absurd": ["no"]}}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(data))
    config = {"model": "tiny-random", "vectors": str(tmp_path / "v.safetensors"),
              "questions": str(tmp_path / "q.json"), "n_per_question": 3, "min_mass": 0.0,
              "magnitude_mode": "absolute", "magnitudes": [4.0], "batch_size": 4}  # fmt: skip
    m = run_yes_bias(config, tmp_path / "out", lm=tiny)
    assert m == json.loads((tmp_path / "out" / "metrics.json").read_text())
    for f in ("summary.md", "yes_bias.png", "scores.parquet"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(scores) == 12 and m["overall"]["n_pairs"] == 6
    # Batch size changes nothing (rows with different steerings share a batch).
    one = run_yes_bias(config | {"batch_size": 1}, tmp_path / "one", lm=tiny)
    other = pd.read_parquet(tmp_path / "one" / "scores.parquet")
    assert np.abs(scores["p_yes"].to_numpy() - other["p_yes"].to_numpy()).max() < 1e-4
    assert one["overall"]["delta"]["mean"] == pytest.approx(m["overall"]["delta"]["mean"], abs=1e-4)
    # Steering changed the steered rows' answers (tiny-random's mass is tiny, hence min_mass 0).
    s, u = scores[scores["steered"]], scores[~scores["steered"]]
    assert not np.allclose(s["p_yes"].to_numpy(), u["p_yes"].to_numpy())
    assert "Yes-bias control" in (tmp_path / "out" / "summary.md").read_text()


def test_a_plan_stage_is_checked_like_any_other():
    plan = {
        "name": "controls", "model": "tiny-random",
        "stages": {
            "random": {"kind": "vectors", "type": "random", "n": 20, "n_train": 10},
            "yes": {"kind": "eval", "suite": "yes-bias", "models": ["base"],
                    "vectors": ["random"], "options": {"min_mass": 0.3}},
        },
    }  # fmt: skip
    parse_plan(plan)
    plan["stages"]["yes"]["options"] = {"min_mass": 1.5}
    with pytest.raises(Exception, match=r"stages\.yes\.options\.min_mass"):
        parse_plan(plan)


def test_the_command_refuses_a_bad_option_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "eval", "yes-bias", "--vectors", "v.safetensors",
         "--min-mass", "2", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: min_mass:") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_logit_stats_equal_a_plain_forward_over_the_whole_prompt(tiny):
    """An unsteered row's statistics against one ordinary forward of its full text."""
    from introspect.detection import LOGIT_STATS, DetectionExample, score_detection

    ex = DetectionExample("Tell me about tides.", "Tides follow the Moon.", "Is ice cold?" + ASK)
    got = score_detection(tiny.model, tiny.tokenizer, [ex, ex], batch_size=2, stats=True)
    assert set(got.stats) == set(LOGIT_STATS)
    tok = tiny.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": ex.context_prompt},
         {"role": "assistant", "content": ex.assistant_response},
         {"role": "user", "content": ex.detection_question},
         {"role": "assistant", "content": "The answer is"}],
        tokenize=False, continue_final_message=True,
    )  # fmt: skip
    with torch.no_grad():
        logits = tiny.model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits
    z = logits[0, -1].double()
    p = z.softmax(-1)
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    expected = {
        "entropy": float(-(p * p.log()).sum()),
        "yes_no_gap": float(z[yes] - z[no]),
        "top1_logprob": float(p.max().log()),
        "top10_mass": float(p.sort(descending=True).values[:10].sum()),
        "logsumexp": float(z.exp().sum().log()),
    }
    for k, v in expected.items():
        assert got.stats[k][0] == pytest.approx(v, abs=1e-3), k
        assert got.stats[k][1] == got.stats[k][0]  # the twin row, scored once and shared


def test_the_probe_finds_a_shift_and_not_noise_like_sklearn_does():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from introspect.logit_probe import probe_auroc

    rng = np.random.default_rng(0)
    n = 400
    y = np.arange(n) % 2 == 0
    groups = np.arange(n) // 8  # 50 "questions", each with steered and unsteered rows
    noise = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    shifted = noise.assign(a=noise["a"] + 1.5 * y)
    got = probe_auroc(shifted, y, groups)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    oof = cross_val_predict(model, shifted.to_numpy(), y, groups=groups,
                            cv=GroupKFold(n_splits=5), method="decision_function")  # fmt: skip
    assert got["auroc"] == pytest.approx(roc_auc_score(y, oof), abs=1e-9)
    assert got["auroc"] > 0.8 and got["ci"][0] < got["auroc"] < got["ci"][1]
    flat = probe_auroc(noise, y, groups)
    assert flat["ci"][0] < 0.5 < flat["ci"][1]
    assert math.isnan(probe_auroc(noise, np.ones(n, bool), groups)["auroc"])
