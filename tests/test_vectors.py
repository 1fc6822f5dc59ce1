"""Vector files: format, determinism, validation, concept extraction."""

import json

import pytest
import torch
from safetensors import safe_open

from introspect.errors import IntrospectError
from introspect.vectors import (
    VectorSet,
    concept_vectors,
    default_concepts,
    load_vectors,
    random_vectors,
    save_vectors,
)


def test_random_vectors_are_unit_gaussian_directions_and_seeded():
    a = random_vectors(64, 200, seed=42)
    assert a.shape == (200, 64) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(200), atol=1e-6)
    assert torch.equal(a, random_vectors(64, 200, seed=42))
    assert not torch.equal(a, random_vectors(64, 200, seed=43))
    # Isotropic: the mean direction of many Gaussian unit vectors is near zero.
    assert random_vectors(64, 5000, seed=1).mean(0).norm() < 0.05


def test_same_seed_gives_byte_identical_file(tmp_path):
    for name in ("a", "b"):
        vs = VectorSet(random_vectors(64, 10, 42), "tiny-random", "random", 5)
        save_vectors(tmp_path / f"{name}.safetensors", vs)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_file_format_matches_design(tmp_path):
    path = tmp_path / "concepts.safetensors"
    vs = VectorSet(random_vectors(64, 3, 0), "m", "concept", 0, names=["a", "b", "c"], layer=2)
    save_vectors(path, vs)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["vectors"]
        meta = f.metadata()
        assert f.get_tensor("vectors").dtype == torch.float32
    assert meta["model"] == "m" and meta["kind"] == "concept" and meta["n_train"] == "0"
    assert json.loads(meta["names"]) == ["a", "b", "c"] and meta["layer"] == "2"
    back = load_vectors(path)
    assert back.name == "concepts" and back.names == ["a", "b", "c"] and back.layer == 2
    assert torch.equal(back.vectors, vs.vectors)
    assert not list(tmp_path.glob(".*")), "no temp file left behind"


def test_wrong_dimension_is_one_clear_error(tmp_path):
    path = tmp_path / "v.safetensors"
    save_vectors(path, VectorSet(random_vectors(32, 4, 0), "other", "random", 2))
    with pytest.raises(IntrospectError, match="d_model=32.*d_model=64"):
        load_vectors(path, d_model=64)


def test_corrupt_or_missing_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(IntrospectError, match="not a readable safetensors"):
        load_vectors(bad)
    with pytest.raises(IntrospectError, match="does not exist"):
        load_vectors(tmp_path / "missing.safetensors")


def test_shipped_concepts_are_enough():
    concepts, templates = default_concepts()
    assert len(set(concepts)) >= 100 and len(templates) >= 10
    assert all(t.count("{concept}") == 1 for t in templates)


def test_concept_vectors_are_mean_differences(tiny):
    from introspect.activations import last_token_activations

    words, templates = ["ocean", "violin", "justice"], ["Tell me about {concept}.", "{concept}!"]
    vs = concept_vectors(tiny, words, templates, layer=2)
    assert vs.kind == "concept" and vs.names == words and vs.layer == 2 and vs.n_train == 0
    # Independent computation: per-concept means minus the grand mean, prompt by prompt.
    means = torch.stack(
        [
            last_token_activations(tiny, [t.format(concept=w) for t in templates], 2)
            .double()
            .mean(0)
            for w in words
        ]
    )
    expected = means - means.mean(0)
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(vs.vectors.double(), expected, atol=1e-5)


def test_concept_layer_out_of_range(tiny):
    with pytest.raises(IntrospectError, match="layer"):
        concept_vectors(tiny, ["a", "b"], ["{concept}"], layer=tiny.n_layers)
