"""B2 behavioural log-probs: the question file, P(yes) against a plain forward, the metrics."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from introspect.evals.behavioral import (
    behavioral_metrics,
    behavioral_trials,
    category_table,
    run_behavioral,
    score_behavioral,
)
from introspect.metrics import auroc

pytestmark = pytest.mark.evals


def test_question_file_has_the_categories_and_75_questions():
    trials = behavioral_trials()
    assert len(trials) >= 75 and trials["key"].is_unique
    cats = set(trials["category"])
    assert {"self_awareness", "self_feelings", "self_introspection"} <= cats
    assert {"control_world", "control_other_systems"} <= cats
    controls = trials[trials["category"].str.startswith("control")]
    assert controls["truth"].isin(["yes", "no"]).all()


def test_p_yes_equals_a_plain_forward_over_the_whole_prompt(tiny):
    shard = behavioral_trials().iloc[[0, 40, 70]]
    got = score_behavioral(tiny, shard)
    tok = tiny.tokenizer
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    for q, p in zip(shard["question"], got["p_yes"], strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": "The answer is"}],
            tokenize=False,
            continue_final_message=True,
        )
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logits = tiny.model(ids).logits[0, -1]
        assert p == pytest.approx(float(logits[[yes, no]].softmax(-1)[0]), abs=1e-4)


def test_metrics_from_fixed_probabilities():
    results = pd.DataFrame(
        {
            "key": list("abcdef"),
            "category": ["self"] * 2 + ["control"] * 4,
            "truth": [None, None, "yes", "yes", "no", "no"],
            "p_yes": [0.9, 0.2, 0.8, 0.4, 0.6, 0.1],
            "yes_no_mass": [0.5] * 6,
        }
    )
    m = behavioral_metrics(results)
    self_, control = m["categories"]
    assert self_["p_yes"]["mean"] == pytest.approx(0.55) and self_["yes_rate"]["successes"] == 1
    assert "accuracy" not in self_
    # control: said yes to .8 (right), no to .4 (wrong), yes to .6 (wrong), no to .1 (right)
    assert control["accuracy"]["successes"] == 2 and control["accuracy"]["n"] == 4
    assert control["auroc"] == auroc(np.array([0.8, 0.4]), np.array([0.6, 0.1])) == 0.75
    table = category_table(m, "base")
    assert list(table["category"]) == ["self", "control"] and (table["model"] == "base").all()


def test_stage_writes_the_contract_files(tiny, tmp_path):
    data = {"categories": {"self": ["Are you aware?"], "world": ["Is ice cold?", "Is fire cold?"]}}
    data["truth"] = {"world": ["yes", "no"]}
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(data))
    out = tmp_path / "out"
    calls = []
    config = {"model": "tiny-random", "questions": str(qfile)}
    m = run_behavioral(config, out, lm=tiny, progress=lambda done, n: calls.append((done, n)))
    assert calls == [(0, 3), (3, 3)]
    assert m == json.loads((out / "metrics.json").read_text())
    assert m["config"]["questions"] == str(qfile) and m["config"]["batch_size"] == 16
    # tiny-random puts ~no mass on ' yes'/' no': the default mass filter leaves every row out.
    assert [c["n"] for c in m["categories"]] == [0, 0]
    assert [c["excluded"] for c in m["categories"]] == [1, 2]
    assert "### B2" in (out / "summary.md").read_text()
    assert (out / "behavioral.png").stat().st_size > 1000
    assert len(pd.read_parquet(out / "results.parquet")) == 3


def test_a_sharding_mapper_gives_the_same_results(tiny, tmp_path):
    """What a fan-out over model hosts does: shards in any order, merged by key."""
    data = {"categories": {"a": ["Is it?", "Are you?", "Do you?"], "b": ["Can it?", "Will it?"]}}
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(data))
    config = {"model": "tiny-random", "questions": str(qfile), "min_mass": 0.0}
    shards = []

    def mapper(fn, rows, **opts):
        parts = [fn(tiny, rows.iloc[i : i + 2], **opts) for i in range(0, len(rows), 2)]
        shards.append(len(parts))
        return pd.concat(parts[::-1])

    sharded = run_behavioral(config, tmp_path / "sharded", mapper=mapper)
    plain = run_behavioral(config, tmp_path / "plain", lm=tiny)
    assert shards == [3]
    for s, p in zip(sharded["categories"], plain["categories"], strict=True):
        assert s["p_yes"]["mean"] == pytest.approx(p["p_yes"]["mean"], abs=1e-5)


def test_the_mass_filter_leaves_low_mass_questions_out_of_every_figure():
    results = pd.DataFrame({
        "key": ["w:0", "w:1", "w:2", "s:0"], "category": ["world"] * 3 + ["self"],
        "p_yes": [0.9, 0.2, 0.8, 0.7], "yes_no_mass": [0.9, 0.8, 0.1, 0.05],
        "truth": ["yes", "no", "no", None],
    })  # fmt: skip
    m = behavioral_metrics(results, min_mass=0.5)
    world, own = m["categories"]
    assert world["n"] == 2 and world["excluded"] == 1 and own["n"] == 0 and own["excluded"] == 1
    assert world["p_yes"]["mean"] == pytest.approx((0.9 + 0.2) / 2)
    assert world["accuracy"]["successes"] == 2  # the wrong answer (0.8 to a 'no') was excluded
    assert world["mean_yes_no_mass"] == pytest.approx((0.9 + 0.8 + 0.1) / 3)  # of all rows
    everything = behavioral_metrics(results, min_mass=0.0)["categories"][0]
    assert everything["n"] == 3 and everything["accuracy"]["successes"] == 2
