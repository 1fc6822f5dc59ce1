"""Two more steering-vector families, for the transfer matrix (train family × evaluated family).

* **matched** random - Gaussian directions drawn with the covariance of the model's own
  residual activations (last tokens of the concept prompts at ``layer``), then unit-normalised.
  Every family here is a unit vector scaled by the same relative magnitudes, so all are
  norm-matched; this family is also matched in *shape*: it points where activations vary,
  not uniformly in every direction as plain random vectors do.
* **contrast** pairs (CAA / RepE-style) - per concept, the activation difference between each
  template about the concept and the same template about something neutral; the direction is
  the first principal component of those differences (uncentred), signed to agree with their
  mean. Mean-difference concept vectors (:func:`introspect.vectors.concept_vectors`) instead
  subtract the mean over all concepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from introspect.activations import last_token_activations
from introspect.errors import IntrospectError
from introspect.models import LoadedModel
from introspect.vectors import VectorSet, default_concept_layer, unit_rows

NEUTRAL = "something"  # what a contrast pair's other half is about


def _layer(lm: LoadedModel, layer: int | None) -> int:
    layer = default_concept_layer(lm.n_layers) if layer is None else layer
    if not 0 <= layer < lm.n_layers:
        raise IntrospectError(f"layer: {layer} is outside the model's {lm.n_layers} layers")
    return layer


def matched_vectors(
    lm: LoadedModel,
    prompts: Sequence[str],
    n: int,
    n_train: int,
    seed: int = 0,
    layer: int | None = None,
    batch_size: int = 16,
) -> VectorSet:
    """``n`` unit directions ~ N(0, Σ), Σ the covariance of the prompts' last-token
    activations at ``layer``; the same seed and prompts give the same rows."""
    layer = _layer(lm, layer)
    acts = last_token_activations(lm, prompts, layer, batch_size).double()
    centred = acts - acts.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, centred.shape[0], generator=g, dtype=torch.float64)
    rows = unit_rows(z @ centred).float()  # each row a Gaussian draw with covariance ∝ Σ
    return VectorSet(rows, lm.name, "matched", n_train, layer=layer)


def contrast_vectors(
    lm: LoadedModel,
    concepts: Sequence[str],
    templates: Sequence[str],
    n_train: int = 0,
    layer: int | None = None,
    batch_size: int = 16,
) -> VectorSet:
    """One direction per concept: the top principal component of its contrast-pair
    differences (template about the concept minus the same template about :data:`NEUTRAL`)."""
    layer = _layer(lm, layer)
    about = [t.format(concept=c) for c in concepts for t in templates]
    neutral = [t.format(concept=NEUTRAL) for t in templates]
    acts = last_token_activations(lm, about, layer, batch_size).double()
    base = last_token_activations(lm, neutral, layer, batch_size).double()
    diffs = acts.view(len(concepts), len(templates), -1) - base[None]
    out = []
    for d in diffs:
        top = torch.linalg.svd(d, full_matrices=False).Vh[0]
        out.append(top if float(top @ d.mean(0)) >= 0 else -top)
    rows = unit_rows(torch.stack(out)).float()
    return VectorSet(rows, lm.name, "contrast", n_train, names=list(concepts), layer=layer)
