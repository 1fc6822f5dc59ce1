"""The prefix pass shared between rows that read the same prefix, and the suffix pass between
rows that also ask the same question.

Steering adds to the *output* of decoder layers ``[layer_start, layer_end)``, so through its first
steered layer a row is exactly its unsteered prefix: the keys/values of layers ``0..layer_start``
(a layer's keys/values come from its input) and ``layer_start``'s output before the addition do
not depend on the steering. An evaluation asks many steerings of one context, so here each
distinct prefix is run once, as one "prefix stream", and a steered row only gets its own stream
from ``layer_start + 1`` on, starting from its prefix's output of ``layer_start`` plus its
steering. Unsteered rows never leave their prefix stream. A prefix stream stops once no row of the
batch reads it any more.

The depth is cut at every distinct leave layer of the batch: within a segment the set of streams
is fixed, so the segment runs as one batched call per layer with the ordinary steering hooks on.
With a single ``layer_start`` L this is two segments: shared ``[0, L]``, per-row ``(L, n)``. The
last layer runs its MLP only where an output is read (:func:`last_layer`): nowhere in the prefix
pass, at each row's answer position in the suffix pass.

Across prefixes, in fp32 on a CPU, the tokens every prefix of a batch starts with (the chat
template's system turn, :func:`shared_head`) are one more shared stream: the "head" runs first as a
batch with one prefix, then each prefix's remaining tokens (its "tail") run as above, reading their
rows' head keys/values as a past, and the cache is put back in the plain pass's layout
(:func:`_head_in_place`). Padding positions then hold other (finite) numbers than the plain pass's;
every later pass masks them.

The suffix (question and prefill, unsteered) reads the cache, and a row's cache is its unsteered
prefix's up to and including layer ``layer_start``; so a steered row's suffix is its unsteered
twin's through that layer (:func:`shared_suffix_hidden`: suffix streams, cut at
``layer_start + 1``). B1 asks each steered trial's question of its unsteered twin too, so this
runs about a fifth fewer suffix token-layers there. Scoring only: in training, a shared stream
would share its LoRA dropout masks between rows.

The model's own forward always starts at the embeddings, so the decoder layers are looped over
here by hand, as ``LlamaModel.forward`` does in transformers 5.24: a causal mask per layer kind
(``create_causal_mask``, sized on an empty ``DynamicCache``), rotary embeddings from the position
ids, each layer filling its slot of a ``DynamicCache``. Only backbones whose forward is known to be
exactly that loop (:data:`SUPPORTED`) share; :func:`introspect.detection.prefix_cache` falls back
to the plain :func:`introspect.detection.steered_cache` for any other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import pairwise
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from introspect.errors import IntrospectError
from introspect.models import backbone, cache_kwargs
from introspect.steering import Steering, added, position_mask, steer


class DetectionBatch(Protocol):
    """What is read of ``introspect.detection.DetectionBatch`` (not imported: it imports us)."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_lens: torch.Tensor
    steerings: Sequence[Steering | None]


class SuffixBatch(DetectionBatch, Protocol):
    """A :class:`DetectionBatch` with its suffixes (right-padded)."""

    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_lens: torch.Tensor


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
    """The layer at which each row leaves its stream (``n_layers``: never): one past
    ``layer_start``. Steering adds to ``layer_start``'s *output*, so that layer's input and
    keys/values are still its prefix's (or its unsteered twin's, in the suffix pass); the prefix
    pass adds the steering to the stream's output as the row leaves (:func:`_streams`).
    A row steered only at the last layer never leaves: that layer's output reaches no key or
    value."""
    return [n_layers if s is None else min(n_layers, s.layer_start + 1) for s in steerings]


def _layer_kinds(inner: nn.Module) -> list[str]:
    """Each layer's mask kind, picked as the backbone's own forward picks it."""
    config, n = inner.config, len(inner.layers)
    if type(inner).__name__ == "Qwen2Model":
        return list(config.layer_types[:n])
    if type(inner).__name__ == "MistralModel" and config.sliding_window is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def _segment(
    shared_of: list[int], leave: list[int], start: int, end: int, where: dict
) -> tuple[list[tuple[str, int]], list[int], list[int], dict, list[int]]:
    """Layers ``[start, end)``'s streams: each shared stream (row r's is ``shared_of[r]``) some
    row still reads, then each row that has left, running alone. Returns ``(streams, source,
    like, where, read)``: each stream's input, an index into the last segment's output (whose
    stream -> index map is ``where``): its own, or for a row leaving at ``start`` its shared
    stream's; a row each stream stands for (for tokens, masks and a past: its own, or a member
    still in it); this segment's stream -> index map; and the stream each row reads."""
    rows = range(len(shared_of))
    alive = sorted({shared_of[r] for r in rows if leave[r] >= end})
    left = [r for r in rows if leave[r] <= start]
    streams = [("shared", u) for u in alive] + [("row", r) for r in left]
    source = [
        where[("shared", shared_of[i])] if kind == "row" and leave[i] == start else where[(kind, i)]
        for kind, i in streams
    ]
    like = [
        i if kind == "row" else next(r for r in rows if shared_of[r] == i and leave[r] >= end)
        for kind, i in streams
    ]
    now = {s: j for j, s in enumerate(streams)}
    read = [now[("row", r)] if leave[r] <= start else now[("shared", shared_of[r])] for r in rows]
    return streams, source, like, now, read


def last_layer(layer: nn.Module, hidden: torch.Tensor, pick, cache, **kwargs):
    """The model's last decoder layer, its own forward (Llama, Mistral, Qwen2 alike) split at the
    MLP: attention for every token, which fills ``cache``, then the MLP only at the outputs
    ``pick(states)`` takes; ``pick=None``: none (a prefix pass wants the cache only). The other
    tokens' last outputs feed nothing, so this is most of a layer saved. The layer's forward hooks
    do not run: steering the last layer changes no key, value or answer either."""
    attn = layer.self_attn
    out, _ = attn(layer.input_layernorm(hidden), **kwargs, **cache_kwargs(attn, cache))
    if pick is None:
        return None
    hidden = pick(hidden) + pick(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _run_layers(
    inner: nn.Module,
    hidden: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    layers: range,
    cache: DynamicCache | None = None,
    pick=None,
) -> tuple[torch.Tensor | None, DynamicCache]:
    """Decoder layers ``layers`` on ``hidden``: the output and a cache holding those layers.

    ``cache``: keys/values the tokens follow (layers ``layers`` filled; :func:`_rows_cache`).
    Where ``layers`` ends at the model's last layer, that layer runs as :func:`last_layer` with
    ``pick``: the output is ``pick``'s outputs only, or None.
    """
    past = cache is not None
    cache = cache if past else DynamicCache(config=inner.config)
    # Masks are sized on the cache (on its first layer that runs, when it holds a past), so they
    # are made before the layers add to it, as in the forward.
    kw = dict(inputs_embeds=hidden, attention_mask=attention, cache=cache, position_ids=positions)
    if past:
        kw["layer_idx"] = layers.start
    # Here, not at the top: transformers' masking module imports torch._dynamo (~3 s), which
    # the processes that only tokenise (Ray Data's tasks) never need.
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
    }
    kinds = _layer_kinds(inner)
    masks = {k: makers[k](config=inner.config, **kw) for k in {kinds[i] for i in layers}}
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    for i in layers:
        layer = inner.layers[i]
        kwargs = dict(attention_mask=masks[kinds[i]], position_embeddings=rotary,
                      position_ids=positions, use_cache=True)  # fmt: skip
        if i == len(inner.layers) - 1:
            return last_layer(layer, hidden, pick, cache, **kwargs), cache
        out = layer(hidden, **kwargs, **cache_kwargs(layer, cache))
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
    return hidden, cache


def shared_cache(model: nn.Module, batch: DetectionBatch) -> DynamicCache:
    """The steered prefix cache of ``batch``, equal to ``steered_cache``'s at every real token,
    computing each distinct prefix once through the layers where its rows' steerings begin, and
    (in fp32 on a CPU) the tokens every prefix starts with (:func:`shared_head`) once a batch.

    Runs under ``no_grad``. Raises IntrospectError for a backbone outside :data:`SUPPORTED`.
    """
    if not supported(model):
        raise IntrospectError(
            f"model: prefix sharing supports {', '.join(SUPPORTED)}, not "
            f"{type(backbone(model)).__name__}; use steered_cache"
        )
    firsts, prefix_of = distinct_prefixes(batch)
    ids, real = batch.prefix_ids, batch.prefix_mask
    lengths = batch.prefix_lens.tolist()
    width = ids.shape[1]
    # Left padding: a row's first real token sits at position 0, as it would alone.
    positions = (real.cumsum(1) - 1).clamp(min=0)
    mask = position_mask(batch.steerings, lengths, width).to(ids.device)
    weight = next(model.parameters())
    pays = weight.device.type == "cpu" and weight.dtype == torch.float32  # see MIN_PREFIXES
    head = shared_head(batch, firsts) if pays and suffix_supported(model) else 0
    with torch.no_grad():
        if not head:
            return _streams(model, ids, real, positions, mask, prefix_of, batch.steerings)
        # The head: one prefix for every row, until the rows' steerings begin.
        cols = (width - batch.prefix_lens)[:, None] + torch.arange(head, device=ids.device)
        past = _streams(
            model, ids.gather(1, cols), torch.ones_like(cols), positions.gather(1, cols),
            mask.gather(1, cols), [0] * len(prefix_of), batch.steerings,
        )  # fmt: skip
        # The tails, left-padded to width - head, following their rows' heads: row b's tail
        # token k is its token k + head (the first width - head columns of the mask say which
        # are real). Padding reads the head: garbage, but finite and never read.
        tail = real[:, : width - head]
        cache = _streams(
            model, ids[:, head:], tail, positions[:, head:], mask[:, head:] * tail, prefix_of,
            batch.steerings, past,
        )  # fmt: skip
    return _head_in_place(cache, batch.prefix_lens, head)


# When the head is shared: its own pass costs a second, smaller batched call a layer, which pays
# only with a few prefixes to save it for and where matmuls dominate. Measured on 2-core CPUs
# (SmolLM2-135M, a head of 24 tokens): in fp32, B1's batches of 16 (7-8 prefixes) scored 2-6 %
# faster (AVX512 without AMX, 1 and 2 threads; an earlier try on an AMX CPU: 2 %); in bf16 on the
# AMX CPU 11 % slower; training batches of 2 prefixes (contexts_per_batch: 2) ran 7 % slower in
# fp32. Hence fp32 on a CPU and MIN_PREFIXES. A GPU is unmeasured: a small model's passes there
# are bound by kernel launches, which the head's pass adds to.
MIN_HEAD = 8
MIN_PREFIXES = 4


def shared_head(batch: DetectionBatch, firsts: list[int]) -> int:
    """How many tokens every distinct prefix of ``batch`` starts with (a chat template's system
    turn), leaving each at least one token of its own; 0 when that is under :data:`MIN_HEAD` or
    the batch has fewer than :data:`MIN_PREFIXES` distinct prefixes."""
    if len(firsts) < MIN_PREFIXES:
        return 0
    lengths = batch.prefix_lens.tolist()
    width = batch.prefix_ids.shape[1]
    seqs = [batch.prefix_ids[f, width - lengths[f] :].tolist() for f in firsts]
    head = 0
    for column in zip(*seqs):  # noqa: B905  stops at the shortest prefix
        if any(t != column[0] for t in column):
            break
        head += 1
    head = min(head, min(lengths) - 1)
    return head if head >= MIN_HEAD else 0


def _head_in_place(cache: DynamicCache, lengths: torch.Tensor, head: int) -> DynamicCache:
    """A ``[head][tail, left-padded]`` cache in the plain pass's left-padded layout: row b's
    column t is its column t - pad_b in the head (pad_b <= t < pad_b + head), else column t
    (the tail's real tokens are already where the plain layout has them)."""
    keys = cache.layers[0].keys
    width = keys.shape[2]
    t = torch.arange(width, device=keys.device)
    pad = (width - lengths.to(keys.device))[:, None]
    src = torch.where((t >= pad) & (t < pad + head), t - pad, t)  # [B, width]
    for layer in cache.layers:
        index = src[:, None, :, None].expand_as(layer.keys)
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    return cache


def _streams(
    model: nn.Module,
    ids: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    prefix_of: list[int],
    steerings: Sequence[Steering | None],
    past: DynamicCache | None = None,
) -> DynamicCache:
    """The prefix streams over tokens ``ids`` ``[B, W]`` (row r's tokens, those of its prefix
    ``prefix_of[r]``), with ``attention``, ``positions`` and steered positions ``mask`` for each
    row: the cache, a row per batch row. ``past``: a cache, a row per batch row, that the
    tokens follow (the head); a stream reads the row of a member still in it."""
    inner = backbone(model)
    n_layers = len(inner.layers)
    leave = leave_layers(steerings, n_layers)
    final = DynamicCache(config=inner.config)
    firsts = [prefix_of.index(u) for u in range(max(prefix_of) + 1)]
    hidden = inner.embed_tokens(ids[firsts])
    where = {("shared", u): u for u in range(len(firsts))}  # stream -> its index in `hidden`
    for start, end in pairwise(sorted({0, n_layers, *leave})):
        # A prefix stream runs while some row still reads it; a row that left runs alone. Each
        # row reads the keys/values of its own stream once it has left, else its prefix's.
        streams, source, like, where, read = _segment(prefix_of, leave, start, end, where)
        stream_steerings = [steerings[i] if kind == "row" else None for kind, i in streams]
        hidden = hidden[source]
        # A row leaving here takes its prefix's output of layer start - 1: if its steering
        # adds to that layer, add it now, as that layer's hook would have.
        for j, s in enumerate(stream_steerings):
            if s is not None and leave[like[j]] == start and s.layer_start < start <= s.layer_end:
                hidden[j] += mask[like[j], :, None].to(hidden) * added(s, hidden)
        layers = range(start, end)
        seen, cache = attention[like], None
        if past is not None:
            cache = _rows_cache(inner, past, like, layers)
            seen = torch.cat([seen.new_ones(len(like), cache.layers[start].keys.shape[2]), seen], 1)
        with steer(model, stream_steerings, mask=mask[like]):
            hidden, cache = _run_layers(inner, hidden, seen, positions[like], layers, cache)
        index = torch.tensor(read, device=ids.device)
        for i in layers:
            cache.layers[i].batch_select_indices(index)
            final.layers[i] = cache.layers[i]
    return final


def _read_only_update(layer, key_states, value_states, *args, **kwargs):
    return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)


def read_only(cache: DynamicCache) -> DynamicCache:
    """The cache with each layer's ``update`` returning stored + new states without storing.

    Under gradient checkpointing the backward pass replays the suffix through every layer; a
    cache that grew in the first pass would hand the replay a longer prefix
    (:mod:`introspect.recompute`). Only the suffix's last position is read, so nothing needs
    storing anyway.
    """
    for layer in cache.layers:
        layer.update = functools.partial(_read_only_update, layer)
    return cache


def _rows_cache(inner: nn.Module, full: DynamicCache, rows: list[int], layers: range):
    """A cache whose layers ``layers`` hold rows ``rows`` of ``full``."""
    cache = DynamicCache(config=inner.config)
    index = torch.tensor(rows, device=full.layers[layers.start].keys.device)
    for i in layers:
        cache.layers[i].update(full.layers[i].keys[index], full.layers[i].values[index])
    return cache


def suffix_supported(model: nn.Module) -> bool:
    """Whether :func:`shared_suffix_hidden` can run ``model``: a shared-prefix backbone whose
    layers all attend over the whole past (a sliding window's cache keeps other state)."""
    return supported(model) and set(_layer_kinds(backbone(model))) == {"full_attention"}


def shared_suffix_hidden(model: nn.Module, batch: SuffixBatch, cache: DynamicCache) -> torch.Tensor:
    """``[B, d]``: each row's last suffix token after the final norm, as the plain suffix pass on
    ``cache`` (the steered prefix cache, one row per batch row) gives it.

    A row's cache is its unsteered prefix's up to and including layer ``layer_start`` (a layer's
    keys/values come from its input), so its suffix pass is its unsteered twin's through that
    layer. Rows with the same prefix and suffix run as one stream until their steerings'
    ``layer_start + 1``, as :func:`shared_cache` does for the prefix.
    """
    inner = backbone(model)
    n_layers = len(inner.layers)
    _, prefix_of = distinct_prefixes(batch)
    keys = [
        (prefix_of[r], n, tuple(ids))
        for r, (ids, n) in enumerate(
            zip(batch.suffix_ids.tolist(), batch.suffix_lens.tolist(), strict=True)
        )
    ]
    group_ids: dict[tuple, int] = {}
    group_of = [group_ids.setdefault(k, len(group_ids)) for k in keys]
    firsts = [group_of.index(g) for g in range(len(group_ids))]
    leave = leave_layers(batch.steerings, n_layers)
    width = batch.suffix_ids.shape[1]
    positions = batch.prefix_lens[:, None] + torch.arange(width, device=batch.suffix_ids.device)
    attention = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)
    hidden = inner.embed_tokens(batch.suffix_ids[firsts])
    where = {("shared", g): g for g in range(len(firsts))}
    for start, end in pairwise(sorted({0, n_layers, *leave})):
        # A group reads the cache of a member still in it: below its leave layer, any such
        # member's cache is the unsteered prefix's. Each row's answer is its last suffix token
        # out of its own stream, else its group's.
        streams, source, like, where, read = _segment(group_of, leave, start, end, where)
        index = torch.tensor(read, device=hidden.device), batch.suffix_lens - 1
        layers = range(start, end)
        hidden, _ = _run_layers(
            inner, hidden[source], attention[like], positions[like], layers,
            read_only(_rows_cache(inner, cache, like, layers)),
            pick=lambda states, i=index: states[i],
        )  # fmt: skip
    return inner.norm(hidden)
