"""Steering vector sets: random Gaussian directions and concept directions, as safetensors files.

File format (DESIGN.md): tensor ``vectors`` ``[N, d_model]`` float32 with unit rows; metadata
``model``, ``kind`` (random|concept), ``n_train`` (rows ``< n_train`` are for training), ``names``
(JSON list, concept vectors), ``layer`` (concept extraction layer).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from introspect.activations import last_token_activations
from introspect.errors import IntrospectError
from introspect.io import atomic_write
from introspect.models import LoadedModel


@dataclass
class VectorSet:
    """Unit steering directions with their provenance."""

    vectors: torch.Tensor  # [N, d_model] float32, unit rows
    model: str
    kind: str
    n_train: int
    names: list[str] = field(default_factory=list)
    layer: int | None = None
    name: str = ""  # how examples refer to this set: the file's stem

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def check_model(self, d_model: int) -> None:
        """Fail with one line when these vectors were made for a model of another width."""
        if self.d_model != d_model:
            raise IntrospectError(
                f"vectors: {self.name or 'vector set'} has d_model={self.d_model} (made for "
                f"{self.model}) but the model has d_model={d_model}; make vectors for this model"
            )


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def random_vectors(d_model: int, n: int, seed: int) -> torch.Tensor:
    """``n`` Gaussian directions in ``d_model`` dimensions; the same seed gives the same rows."""
    if n < 1:
        raise IntrospectError(f"n: {n} must be >= 1")
    g = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(n, d_model, generator=g, dtype=torch.float64)).float()


def save_vectors(path: str | os.PathLike, vs: VectorSet) -> None:
    """Write atomically (temp file + rename), so a killed run never leaves a half file."""
    path = Path(path)
    if not 0 <= vs.n_train <= vs.vectors.shape[0]:
        raise IntrospectError(f"n_train: {vs.n_train} must be within [0, {vs.vectors.shape[0]}]")
    metadata = {"model": vs.model, "kind": vs.kind, "n_train": str(vs.n_train)}
    if vs.names:
        metadata["names"] = json.dumps(vs.names)
    if vs.layer is not None:
        metadata["layer"] = str(vs.layer)
    data = _safetensors_bytes(vs.vectors, metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _safetensors_bytes(vectors: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """One float32 tensor in the safetensors layout, with a sorted header.

    The safetensors library writes metadata in hash-map order, so two saves of the same vectors
    differ byte for byte; plan stages hash their inputs, so the same seed must give the same file.
    Layout: u64 little-endian header length, JSON header padded with spaces to 8 bytes, raw data.
    """
    data = vectors.detach().float().contiguous().cpu().numpy().astype("<f4").tobytes()
    header = {
        "__metadata__": metadata,
        "vectors": {"dtype": "F32", "shape": list(vectors.shape), "data_offsets": [0, len(data)]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def load_vectors(path: str | os.PathLike, d_model: int | None = None) -> VectorSet:
    """Read a vector file, checking its format and (when given) the model's width."""
    path = Path(path)
    if not path.is_file():
        raise IntrospectError(f"vectors: {path} does not exist (make it with `introspect vectors`)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise IntrospectError(f"vectors: {path} is not a readable safetensors file ({e})") from None
    if "vectors" not in tensors or tensors["vectors"].ndim != 2:
        raise IntrospectError(f"vectors: {path} has no 2-d tensor named 'vectors'")
    vectors = tensors["vectors"].float()
    norms = vectors.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise IntrospectError(f"vectors: {path} has rows that are not unit length")
    vs = VectorSet(
        vectors=vectors,
        model=metadata.get("model", ""),
        kind=metadata.get("kind", "random"),
        n_train=int(metadata.get("n_train", vectors.shape[0])),
        names=json.loads(metadata["names"]) if "names" in metadata else [],
        layer=int(metadata["layer"]) if "layer" in metadata else None,
        name=path.stem,
    )
    if d_model is not None:
        vs.check_model(d_model)
    return vs


def default_concepts() -> tuple[list[str], list[str]]:
    """Our shipped concept words and prompt templates (introspect/resources/concepts.json)."""
    return read_concepts(resources.files("introspect") / "resources" / "concepts.json")


def read_concepts(path) -> tuple[list[str], list[str]]:
    """Concept words and templates from a JSON file ``{"concepts": [...], "templates": [...]}``."""
    try:
        data = json.loads(Path(path).read_text())
        concepts, templates = list(data["concepts"]), list(data["templates"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntrospectError(
            f"concepts: {path} must be JSON with lists 'concepts' and 'templates' ({e})"
        ) from None
    bad = [t for t in templates if t.count("{concept}") != 1]
    if bad:
        raise IntrospectError(f"concepts: template {bad[0]!r} needs exactly one {{concept}}")
    if not concepts or not templates:
        raise IntrospectError(f"concepts: {path} has an empty 'concepts' or 'templates' list")
    return concepts, templates


def default_concept_layer(n_layers: int) -> int:
    """About two thirds of the depth, where concept injection is reported to work best."""
    return max(0, min(n_layers - 1, round(2 * n_layers / 3)))


def concept_vectors(
    lm: LoadedModel,
    concepts: Sequence[str],
    templates: Sequence[str],
    layer: int | None = None,
    batch_size: int = 16,
) -> VectorSet:
    """Mean-difference concept directions, unit-normalised.

    For each concept: the mean last-token activation over its templates, minus the shared
    baseline (the mean over all concepts and templates), so what is common to "a prompt about
    some thing" cancels and what is specific to the concept remains.
    """
    layer = default_concept_layer(lm.n_layers) if layer is None else layer
    if not 0 <= layer < lm.n_layers:
        raise IntrospectError(f"layer: {layer} is outside the model's {lm.n_layers} layers")
    prompts = [t.format(concept=c) for c in concepts for t in templates]
    acts = last_token_activations(lm, prompts, layer, batch_size).double()
    per_concept = acts.view(len(concepts), len(templates), -1).mean(1)
    directions = per_concept - per_concept.mean(0, keepdim=True)
    return VectorSet(
        vectors=unit_rows(directions).float(),
        model=lm.name,
        kind="concept",
        n_train=0,
        names=list(concepts),
        layer=layer,
    )
