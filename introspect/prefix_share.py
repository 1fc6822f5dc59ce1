"""The prefix pass shared between rows that read the same prefix.

Steering adds to the *output* of decoder layers ``[layer_start, layer_end)``, so below its first
steered layer a row is exactly its unsteered prefix: the hidden state entering ``layer_start`` and
the keys/values of layers ``0..layer_start`` (a layer's keys/values come from its input) do not
depend on the steering. An evaluation asks many steerings of one context, so here each distinct
prefix is run once, as one "prefix stream", and a steered row only gets its own stream from its
``layer_start`` on, starting from its prefix's hidden state. Unsteered rows never leave their
prefix stream. A prefix stream stops once no row of the batch reads it any more.

The depth is cut at every distinct ``layer_start`` of the batch: within a segment the set of
streams is fixed, so the segment runs as one batched call per layer with the ordinary steering
hooks on. With a single ``layer_start`` this is two segments: shared ``[0, L)``, per-row
``[L, n)``.

The model's own forward always starts at the embeddings, so the decoder layers are looped over
here by hand, as ``LlamaModel.forward`` does in transformers 5.24: a causal mask per layer kind
(``create_causal_mask``, sized on an empty ``DynamicCache``), rotary embeddings from the position
ids, each layer filling its slot of a ``DynamicCache``. Only backbones whose forward is known to be
exactly that loop (:data:`SUPPORTED`) share; :func:`introspect.detection.prefix_cache` falls back
to the plain :func:`introspect.detection.steered_cache` for any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from introspect.errors import IntrospectError
from introspect.models import backbone, cache_kwargs
from introspect.steering import Steering, position_mask, steer


class DetectionBatch(Protocol):
    """What is read of ``introspect.detection.DetectionBatch`` (not imported: it imports us)."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_lens: torch.Tensor
    steerings: Sequence[Steering | None]


# Backbones whose forward is embed -> per-layer (mask, rotary, cache) loop -> norm, nothing else
# (no embedding scale, no extra per-layer inputs); each picks its masks as in _layer_kinds.
SUPPORTED = ("LlamaModel", "MistralModel", "Qwen2Model")


def supported(model: nn.Module) -> bool:
    """Whether the prefix pass of ``model`` (PEFT-wrapped or not) can be shared here."""
    inner = backbone(model)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    return type(inner).__name__ in SUPPORTED and all(hasattr(inner, p) for p in parts)


def distinct_prefixes(batch: DetectionBatch) -> tuple[list[int], list[int]]:
    """``(firsts, prefix_of)``: the first row of each distinct prefix, and each row's prefix.

    Rows match on their ids *and* their length: the pad id can be a real token (often EOS), so
    two prefixes can have the same padded ids and different masks.
    """
    firsts: list[int] = []
    seen: dict[tuple, int] = {}
    prefix_of = []
    lengths = batch.prefix_lens.tolist()
    for b, (ids, n) in enumerate(zip(batch.prefix_ids.tolist(), lengths, strict=True)):
        key = (n, tuple(ids))
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(b)
        prefix_of.append(seen[key])
    return firsts, prefix_of


def leave_layers(steerings: list[Steering | None], n_layers: int) -> list[int]:
    """The layer at which each row leaves its prefix stream (``n_layers``: never, unsteered)."""
    return [n_layers if s is None else s.layer_start for s in steerings]


def _layer_kinds(inner: nn.Module) -> list[str]:
    """Each layer's mask kind, picked as the backbone's own forward picks it."""
    config, n = inner.config, len(inner.layers)
    if type(inner).__name__ == "Qwen2Model":
        return list(config.layer_types[:n])
    if type(inner).__name__ == "MistralModel" and config.sliding_window is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def _run_layers(
    inner: nn.Module,
    hidden: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    layers: range,
) -> tuple[torch.Tensor, DynamicCache]:
    """Decoder layers ``layers`` on ``hidden``: the output and a cache holding those layers."""
    cache = DynamicCache(config=inner.config)
    # Masks are sized on the cache, so they are made while it is still empty, as in the forward.
    kw = dict(inputs_embeds=hidden, attention_mask=attention, cache=cache, position_ids=positions)
    makers = {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
    }
    kinds = _layer_kinds(inner)
    masks = {k: makers[k](config=inner.config, **kw) for k in {kinds[i] for i in layers}}
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    for i in layers:
        layer = inner.layers[i]
        out = layer(
            hidden,
            attention_mask=masks[kinds[i]],
            position_embeddings=rotary,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(layer, cache),
        )
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
    return hidden, cache


def shared_cache(model: nn.Module, batch: DetectionBatch) -> DynamicCache:
    """The steered prefix cache of ``batch``, equal to ``steered_cache``'s, computing each
    distinct prefix once below the layers where its rows' steerings begin.

    Runs under ``no_grad``. Raises IntrospectError for a backbone outside :data:`SUPPORTED`.
    """
    if not supported(model):
        raise IntrospectError(
            f"model: prefix sharing supports {', '.join(SUPPORTED)}, not "
            f"{type(backbone(model)).__name__}; use steered_cache"
        )
    inner = backbone(model)
    n_layers = len(inner.layers)
    firsts, prefix_of = distinct_prefixes(batch)
    leave = leave_layers(batch.steerings, n_layers)
    rows = range(len(prefix_of))
    # Left padding: a row's first real token sits at position 0, as it would alone.
    positions = (batch.prefix_mask.cumsum(1) - 1).clamp(min=0)
    width = batch.prefix_ids.shape[1]
    cuts = sorted({0, n_layers, *leave})
    final = DynamicCache(config=inner.config)
    with torch.no_grad():
        hidden = inner.embed_tokens(batch.prefix_ids[firsts])
        where = {("prefix", u): u for u in range(len(firsts))}  # stream -> its index in `hidden`
        for start, end in pairwise(cuts):
            # A prefix stream runs while some row still reads it; a row that left runs alone.
            alive = sorted({prefix_of[r] for r in rows if leave[r] >= end})
            left = [r for r in rows if leave[r] <= start]
            streams = [("prefix", u) for u in alive] + [("row", r) for r in left]
            # A row leaving at `start` begins from its prefix's hidden state.
            source = [
                where[("prefix", prefix_of[i])] if kind == "row" and leave[i] == start
                else where[(kind, i)]
                for kind, i in streams
            ]  # fmt: skip
            like = [firsts[i] if kind == "prefix" else i for kind, i in streams]  # tokens, mask
            steerings = [batch.steerings[i] if kind == "row" else None for kind, i in streams]
            mask = position_mask(steerings, batch.prefix_lens[like].tolist(), width)
            with steer(model, steerings, mask=mask):
                hidden, cache = _run_layers(
                    inner, hidden[source], batch.prefix_mask[like], positions[like],
                    range(start, end),
                )  # fmt: skip
            where = {s: j for j, s in enumerate(streams)}
            # Each row reads the keys/values of its own stream once it has left, else its prefix's.
            read = [
                where[("row", r)] if leave[r] <= start else where[("prefix", prefix_of[r])]
                for r in rows
            ]
            index = torch.tensor(read, device=hidden.device)
            for i in range(start, end):
                cache.layers[i].batch_select_indices(index)
                final.layers[i] = cache.layers[i]
    return final
