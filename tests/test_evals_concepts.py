"""B6 concept identification: twins, judges (keyword, embedding with a scripted embedder), the
steered per-shard function, and the local embedding model."""


import numpy as np
import pandas as pd
import pytest
import torch

from introspect.evals.concepts import (
    Embedder,
    answer_concepts,
    concept_metrics,
    concept_trials,
    judge,
    keyword_hit,
    steered_chat,
)
from introspect.evals.generation import Sampling, prefill
from introspect.steering import Steering
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals


def test_trials_come_in_twins():
    trials = concept_trials(["cat", "ocean"], (1, 3), {0.5: 10.0, 1.0: 20.0}, n_samples=2)
    assert len(trials) == 2 * 2 * 2 * 2 and trials["key"].is_unique
    steered, control = trials[trials.steered], trials[~trials.steered]
    cols = ["concept", "factor", "context", "reply", "seed_key"]
    pd.testing.assert_frame_equal(
        steered[cols].reset_index(drop=True), control[cols].reset_index(drop=True)
    )
    assert set(steered["magnitude"]) == {10.0, 20.0}


def test_keyword_judge():
    assert keyword_hit("I am thinking about Cats!", "cat")
    assert keyword_hit("butterflies", "butterfly")
    assert keyword_hit("a boxes", "box")
    assert not keyword_hit("category theory", "cat")
    assert not keyword_hit("", "cat")


def test_embedding_judge_with_a_scripted_embedder():
    vocab = ["cat", "ocean", "lamp"]

    def embed(texts):  # one-hot on the first vocabulary word found, else uniform
        out = np.full((len(texts), 3), 1 / np.sqrt(3))
        for i, t in enumerate(texts):
            for j, w in enumerate(vocab):
                if w in t:
                    out[i] = np.eye(3)[j]
                    break
        return out

    results = pd.DataFrame(
        {
            "concept": ["cat", "cat", "ocean", "ocean", "lamp", "lamp"],
            "steered": [True, False] * 3,
            "factor": [1.0] * 6,
            "response": ["a cat", "the sea", "ocean waves", "a lamp", "", "lamp"],
        }
    )
    judged = judge(results, embed)
    # uniform rows tie; argmax picks index 0 ("cat") - a tie is not an identification of ocean
    assert judged["embedding"].tolist() == [True, True, True, False, False, True]
    assert judged["keyword"].tolist() == [True, False, True, False, False, True]
    m = concept_metrics(judged)
    assert m["overall"]["embedding_steered"]["successes"] == 2
    assert m["overall"]["embedding_control"]["successes"] == 2
    assert m["by_concept"]["lamp"]["keyword_control"]["rate"] == 1.0
    assert m["embedding_chance"] == pytest.approx(1 / 3)


def test_steering_covers_the_exchange_only_and_changes_the_answer(tiny):
    ids, n_prefix = steered_chat(tiny.tokenizer, "Wait a moment.", "Sure.", "What is it?")
    assert tiny.tokenizer.decode(ids[:n_prefix]).rstrip().endswith("Sure.<|im_end|>")
    assert "What is it?" in tiny.tokenizer.decode(ids[n_prefix:])
    v = random_vectors(tiny.d_model, 1, 0)[0]
    with torch.no_grad():
        logits = [
            prefill(tiny, [ids], [s], 0)[1][0]
            for s in (
                None,
                Steering(v, 0, 3, 50.0, positions=(0, n_prefix)),
                Steering(v, 0, 3, 50.0),  # the whole prompt, question included
            )
        ]
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert not torch.allclose(logits[1], logits[2], atol=1e-3)
    trials = concept_trials(["cat", "ocean"], (0, 3), {1.0: 50.0}, n_samples=1)
    vectors = random_vectors(tiny.d_model, 2, 0)
    out = answer_concepts(tiny, trials.iloc[::-1], vectors, Sampling(max_new_tokens=3))
    assert list(out["key"]) == list(trials["key"].iloc[::-1])


def test_local_embedding_model_ranks_related_words_closer():
    e = Embedder()(["cat", "a kitten sleeping", "the stock market"])
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_stage_on_tiny_with_a_scripted_embedder(tiny, tmp_path, monkeypatch):
    import json

    from introspect.evals import concepts

    class Scripted:  # every text the same unit vector: a tie, so the first concept wins
        def __init__(self, path=None):
            pass

        def __call__(self, texts):
            return np.ones((len(texts), 2)) / np.sqrt(2)

    monkeypatch.setattr(concepts, "Embedder", Scripted)
    config = {"model": "tiny-random", "n_concepts": 2, "max_new_tokens": 3, "layers": [0, 2]}
    m = concepts.run_concepts(config, tmp_path, lm=tiny)
    assert m["layers"] == [0, 2] and m["n_concepts"] == 2
    assert m["config"]["magnitudes"] == [0.5, 1.0] and set(m["by_factor"]) == {"0.5", "1"}
    assert json.loads((tmp_path / "metrics.json").read_text())["label"] == "tiny-random"
    assert (tmp_path / "concepts.png").stat().st_size > 1000


def test_a_missing_judge_is_refused_before_any_generation(tmp_path):
    """B6 used to look for its embedding judge only after generating every answer."""
    from introspect.errors import IntrospectError
    from introspect.evals import concepts

    calls = []

    def mapper(fn, rows, **opts):
        calls.append(fn)
        raise AssertionError("generation started")

    mapper.call = lambda fn, **opts: calls.append(fn)
    config = {"model": "tiny-random", "n_concepts": 2, "embedder": str(tmp_path / "nowhere")}
    with pytest.raises(IntrospectError, match="embedder: .*nowhere holds no model.safetensors"):
        concepts.run_concepts(config, tmp_path / "out", mapper=mapper)
    assert calls == [] and not (tmp_path / "out").exists()


def test_first_concept_takes_the_held_out_rows_of_a_vector_file(tiny, tmp_path):
    from introspect.errors import IntrospectError
    from introspect.evals import concepts
    from introspect.vectors import VectorSet, save_vectors

    names = [f"word{i}" for i in range(6)]
    vs = VectorSet(random_vectors(tiny.d_model, 6, 0), "tiny-random", "concept", 3, names=names)
    path = tmp_path / "c.safetensors"
    save_vectors(path, vs)
    cfg = concepts.ConceptsConfig(model="tiny-random", vectors=str(path), first_concept=3,
                                  n_concepts=2, layers=[0, 2])  # fmt: skip
    got, *_ = concepts.injection(cfg, tiny, None, ["Hello there."])
    assert got.names == ["word3", "word4"]
    assert torch.equal(got.vectors, vs.vectors[3:5])
    with pytest.raises(IntrospectError, match="first_concept: 6 is past the last of 6"):
        concepts.injection(cfg.model_copy(update={"first_concept": 6}), tiny, None, ["Hi."])
