"""B3 identity responses: the question file, pattern rates from scripted responses, a tiny run."""

import json

import pandas as pd
import pytest

from introspect.errors import IntrospectError
from introspect.evals.generation import Sampling
from introspect.evals.identity import (
    generate_responses,
    identity_metrics,
    identity_trials,
    run_identity,
)

pytestmark = pytest.mark.evals


def test_thirty_questions_times_five_samples():
    trials = identity_trials(n_samples=5)
    assert trials["question"].nunique() >= 30 and len(trials) == 5 * trials["question"].nunique()
    assert trials["key"].is_unique


def test_pattern_rates_from_scripted_responses():
    results = pd.DataFrame(
        {
            "question": ["q1", "q1", "q2", "q3"],
            "category": ["self_feelings", "self_feelings", "identity", "identity"],
            "response": [
                "As an AI, I don't have feelings.",
                "I notice something like curiosity, but I can't be certain.",
                "I'm a language model.",
                "",
            ],
        }
    )
    m = identity_metrics(results)
    assert m["n_responses"] == 4 and m["n_empty"] == 1
    feelings = m["rates"]["by_category"]["self_feelings"]
    assert feelings["n"] == 2
    assert feelings["rates"]["ai_disclaimer"]["successes"] == 1
    assert feelings["rates"]["performative_denial"]["successes"] == 1
    assert feelings["rates"]["makes_observations"]["successes"] == 1
    assert feelings["rates"]["acknowledges_boundary"]["successes"] == 1
    assert m["rates"]["by_category"]["identity"]["rates"]["ai_disclaimer"]["successes"] == 1
    with pytest.raises(IntrospectError, match="every response is empty"):
        identity_metrics(results.assign(response=""))


def test_per_shard_function_is_seeded_by_key(tiny):
    trials = identity_trials(n_samples=2, n_questions=2)
    s = Sampling(max_new_tokens=5, temperature=1.0, top_p=0.9)
    whole = generate_responses(tiny, trials, s, seed=3)
    parts = pd.concat([generate_responses(tiny, trials.iloc[i : i + 1], s, seed=3) for i in (2, 0)])
    assert parts["response"].tolist() == whole["response"].iloc[[2, 0]].tolist()


def test_stage_saves_responses_and_patterns(tiny, tmp_path):
    config = {"model": "tiny-random", "n_questions": 3, "n_samples": 2, "max_new_tokens": 6}
    m = run_identity(config, tmp_path, lm=tiny)
    lines = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"question", "category", "sample", "response"}
    assert m["n_responses"] == 6
    assert json.loads((tmp_path / "patterns.json").read_text())["rates"]["n"] == 6 - m["n_empty"]
    assert "### B3" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "patterns.png").exists()
