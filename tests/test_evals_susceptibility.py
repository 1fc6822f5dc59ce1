"""Steering susceptibility: the next-token KL against a hand-written injection, the metrics,
and the stage files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from introspect.evals.concepts import steered_chat
from introspect.evals.susceptibility import (
    next_token_kl,
    run_susceptibility,
    susceptibility_metrics,
)
from introspect.models import decoder_layers

pytestmark = pytest.mark.evals


def test_kl_equals_a_hand_written_injection(tiny):
    v = torch.nn.functional.normalize(torch.randn(2, 64), dim=1)
    rows = pd.DataFrame({"key": ["a", "b"], "vector_idx": [0, 1], "layer_start": [1, 0],
                         "layer_end": [3, 2], "magnitude": [6.0, 3.0],
                         "context": ["Hold on a moment.", "Okay, give me a second to think."],
                         "reply": ["Sure.", "Of course, take your time."],
                         "question": ["Write anything."] * 2})  # fmt: skip
    got = next_token_kl(tiny, rows, v, batch_size=2)
    for r, kl in zip(rows.itertuples(), got["kl"], strict=True):
        ids, n_prefix = steered_chat(tiny.tokenizer, r.context, r.reply, r.question)
        x = torch.tensor([ids])

        def add(_m, _i, out, r=r, n=n_prefix):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, :n] += r.magnitude * v[r.vector_idx]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        layers = decoder_layers(tiny.model)
        hooks = [layers[i].register_forward_hook(add) for i in range(r.layer_start, r.layer_end)]
        with torch.no_grad():
            steered = tiny.model(x).logits[0, -1].double().log_softmax(-1)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            plain = tiny.model(x).logits[0, -1].double().log_softmax(-1)
        expected = float((steered.exp() * (steered - plain)).sum())
        assert expected > 1e-4 and kl == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_metrics_add_the_kl_to_the_judge_rates():
    judged = pd.DataFrame({"key": ["a:s", "a:c", "b:s", "b:c"], "concept": ["a", "a", "b", "b"],
                           "steered": [True, False, True, False], "factor": [1.0] * 4,
                           "keyword": [True, False, False, False],
                           "embedding": [True, False, True, True],
                           "similarity": [0.5, 0.1, 0.4, 0.3]})  # fmt: skip
    m = susceptibility_metrics(judged, pd.DataFrame({"key": ["a:s", "b:s"], "kl": [0.2, 0.6]}))
    assert m["kl"]["mean"] == pytest.approx(0.4) and m["kl_by_factor"]["1"]["n"] == 2
    assert m["overall"]["keyword_steered"]["successes"] == 1
    assert m["overall"]["embedding_control"]["successes"] == 1
    assert m["verdict"].startswith("free text names the concept 0.50")


def test_the_stage_writes_its_files(tiny, tmp_path):
    config = {"model": "tiny-random", "n_concepts": 2, "n_samples": 1, "max_new_tokens": 4,
              "layers": [1, 3]}  # fmt: skip
    m = run_susceptibility(config, tmp_path / "out", lm=tiny)
    assert m == json.loads((tmp_path / "out" / "metrics.json").read_text())
    for f in ("summary.md", "susceptibility.png", "results.parquet"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(results) == 4 and results.loc[results["steered"], "kl"].gt(0).all()
    assert np.isnan(results.loc[~results["steered"], "kl"]).all()
