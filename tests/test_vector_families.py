"""The matched-random and contrast-pair vector families against independent computations."""

import numpy as np
import torch

from introspect.activations import last_token_activations
from introspect.vector_families import NEUTRAL, contrast_vectors, matched_vectors
from introspect.vectors import load_vectors, save_vectors

PROMPTS = [f"Tell me about {w}." for w in ("cats", "rain", "music", "bread", "trains", "ice")]


def test_matched_vectors_live_in_the_activations_span(tiny, tmp_path):
    vs = matched_vectors(tiny, PROMPTS, n=20, n_train=10, seed=3, layer=2)
    assert vs.vectors.shape == (20, 64) and vs.kind == "matched" and vs.n_train == 10
    assert torch.allclose(vs.vectors.norm(dim=1), torch.ones(20), atol=1e-5)
    acts = last_token_activations(tiny, PROMPTS, 2).double().numpy()
    centred = acts - acts.mean(0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:5]  # rank 5: 6 prompts, centred
    v = vs.vectors.double().numpy()
    assert np.abs(v - (v @ basis.T) @ basis).max() < 1e-4  # nothing outside the span
    again = matched_vectors(tiny, PROMPTS, n=20, n_train=10, seed=3, layer=2)
    assert torch.equal(vs.vectors, again.vectors)
    save_vectors(tmp_path / "m.safetensors", vs)
    assert load_vectors(tmp_path / "m.safetensors").kind == "matched"


def test_contrast_vectors_are_the_top_component_of_the_pair_differences(tiny):
    templates = ["Tell me about {concept}.", "I keep thinking of {concept}.", "{concept}!"]
    vs = contrast_vectors(tiny, ["cats", "rain"], templates, n_train=1, layer=2)
    assert vs.names == ["cats", "rain"] and vs.n_train == 1
    for i, c in enumerate(["cats", "rain"]):
        a = last_token_activations(tiny, [t.format(concept=c) for t in templates], 2).double()
        b = last_token_activations(tiny, [t.format(concept=NEUTRAL) for t in templates], 2)
        d = (a - b.double()).numpy()
        w, e = np.linalg.eigh(d.T @ d)
        top = e[:, -1] * np.sign(e[:, -1] @ d.mean(0))
        assert np.allclose(vs.vectors[i].double().numpy(), top, atol=1e-4)
