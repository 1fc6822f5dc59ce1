"""The training passes without padding: rows packed end to end, so the linear layers, norms and
MLPs (nearly all of a step) see only real tokens.

A padded batch of detection rows wastes what its shorter rows leave empty: on the reference
benchmark's training batches, 9 % of the prefix tokens and 6 % of the suffix tokens. Here the
real tokens of every row sit in one sequence ``[1, N]``, each with its own position ids, and only
attention goes back to rows: :func:`packed_attention` gathers each row's queries, keys and values
into a padded ``[B, H, T, D]`` block, runs the model's SDPA on it with a per-row mask, and puts
the outputs back in packed order. Attention is a few per cent of a step, so the gather costs less
than the padding saved.

The cache holds packed keys and values ``[1, H, N_prefix, D]``; the suffix pass reads it
read-only and appends its own packed ``[1, H, N_suffix, D]``, and each row's keys are its prefix
tokens followed by its suffix tokens (:class:`Layout`). Rows are exactly as in the padded passes
(:func:`introspect.detection.steered_cache`, :func:`introspect.detection.suffix_hidden`): the same
positions, the same keys visible to each query, the same steering of each row's tokens.

The decoder layers are looped over by hand as in :mod:`introspect.prefix_share`, for the same
backbones. Attention goes through :data:`PACKED`, an attention implementation that is the model's
SDPA unless a layer is handed a :class:`Layout`: a pass switches to it for its duration, and
training sets it for good (:func:`use_packed`), so that checkpointed layers replay their attention
in the backward pass the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils.import_utils import is_torch_greater_or_equal

from introspect.models import backbone, cache_kwargs
from introspect.prefix_share import (
    DetectionBatch,
    SuffixBatch,
    last_layer,
    read_only,
    suffix_supported,
)
from introspect.recompute import is_checkpointed
from introspect.steering import position_mask, steer

PACKED = "introspect_packed"
_GQA = is_torch_greater_or_equal("2.5")  # SDPA's enable_gqa


@dataclass
class Layout:
    """Where each row's tokens are in the packed query and key axes.

    ``q_index`` ``[B, Tq]`` and ``kv_index`` ``[B, Tk]``: packed positions of each row's queries
    and keys (padding points at position 0 and is masked); ``mask`` ``[B, 1, Tq, Tk]``: which keys
    each query reads; ``unpack`` ``[N]``: where each packed query sits in the flat ``[B * Tq]``.
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    mask: torch.Tensor
    unpack: torch.Tensor


def _rows(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]``: the packed ``[H, N, D]`` states at ``index`` ``[B, T]``. An
    ``index_select``, whose backward adds rows back (``index_add``), where advanced indexing's
    backward is a sorting ``index_put``."""
    n_rows, width = index.shape
    picked = states.index_select(1, index.reshape(-1))
    return picked.view(states.shape[0], n_rows, width, states.shape[-1]).transpose(0, 1)


def _sdpa(module, query, key, value, mask, **kwargs) -> torch.Tensor:
    """``[B, Tq, H, D]``. On a CPU the key/value heads go to SDPA as they are (``enable_gqa``):
    repeating them for every query head, as transformers does under a mask, costs more than the
    attention itself at these sizes. Elsewhere transformers' call: its masked GPU kernels take
    no GQA."""
    if query.device.type != "cpu" or not _GQA or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)[0]
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask, packed=None, **kwargs):
    """SDPA per row on packed ``[1, H, N, D]`` states given their :class:`Layout`; returns
    ``[1, N, H, D]`` as the attention interface does. Without a layout, the model's SDPA."""
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q = _rows(query[0], packed.q_index)
    k, v = _rows(key[0], packed.kv_index), _rows(value[0], packed.kv_index)
    out = _sdpa(module, q, k, v, packed.mask, **kwargs)  # [B, Tq, H, D]
    n_rows, width, heads, dim = out.shape
    return out.reshape(n_rows * width, heads, dim).index_select(0, packed.unpack)[None], None


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, sdpa_mask)  # unpacked passes build SDPA's masks


def _implementation(model: nn.Module) -> str | None:
    return backbone(model).config._attn_implementation


def can_pack(model: nn.Module) -> bool:
    """Whether the packed passes can run ``model``: a backbone :mod:`introspect.prefix_share`
    loops over with full attention, on SDPA; checkpointed layers only under :func:`use_packed`."""
    if not suffix_supported(model) or _implementation(model) not in ("sdpa", PACKED):
        return False
    return _implementation(model) == PACKED or not is_checkpointed(model)


def use_packed(model: nn.Module) -> None:
    """Give ``model`` the :data:`PACKED` attention for good, where it can take it: SDPA as
    before for every unpacked pass, and checkpointed layers replay packed passes correctly."""
    if suffix_supported(model) and _implementation(model) == "sdpa":
        backbone(model).config._attn_implementation = PACKED


def _starts(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *lengths], device=device).cumsum(0)[:-1]


def _layout(prefix: list[int], suffix: list[int] | None, device) -> Layout:
    """Rows of ``prefix[b]`` tokens (a prefix pass), or of ``suffix[b]`` queries reading their
    ``prefix[b]`` cached tokens then their own (a suffix pass: keys are prefix then suffix)."""
    queries = prefix if suffix is None else suffix
    n_q = torch.tensor(queries, device=device)[:, None]
    n_p = torch.tensor(prefix, device=device)[:, None]
    tq = torch.arange(max(queries), device=device)
    real_q = tq < n_q
    q_index = torch.where(real_q, _starts(queries, device)[:, None] + tq, 0)
    if suffix is None:
        kv_index, tk, seen = q_index, tq, tq[None, :] + 1  # keys 0..t of the row
    else:
        tk = torch.arange(max(p + s for p, s in zip(prefix, suffix, strict=True)), device=device)
        in_suffix = tk[None, :] - n_p
        suffix_at = sum(prefix) + _starts(suffix, device)[:, None] + in_suffix
        kv_index = torch.where(tk < n_p, _starts(prefix, device)[:, None] + tk, suffix_at)
        kv_index = torch.where(in_suffix < n_q, kv_index, 0)
        seen = n_p + tq[None, :] + 1  # the whole prefix and the suffix up to the query
    mask = tk[None, None, :] < seen[..., None]  # [B, Tq, Tk]
    # A padding query reads key 0 only: a row of SDPA with no key at all gives NaN.
    mask = torch.where(real_q[..., None], mask, tk[None, None, :] == 0)
    width = q_index.shape[1]
    unpack = (torch.arange(len(queries), device=device)[:, None] * width + tq)[real_q]
    return Layout(q_index, kv_index, mask[:, None], unpack)


def _pack(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real tokens of padded ``[B, T]`` ids, row after row: ``[1, N]``."""
    return ids[mask.bool()][None]


@contextmanager
def _attention(inner: nn.Module) -> Iterator[None]:
    config = inner.config
    was = config._attn_implementation
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = was


def _run(
    inner, ids, positions, layout: Layout, cache: DynamicCache, keep: torch.Tensor | None
) -> torch.Tensor | None:
    """The decoder layers over packed ``ids``, filling ``cache``; ``[len(keep), d]``: the last
    layer's output at the packed positions ``keep``, which alone go through its MLP (the other
    tokens' last outputs feed nothing). ``keep=None`` (the prefix pass): the cache only, for
    which the last layer's attention is enough."""
    hidden = inner.embed_tokens(ids)
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    *below, last = inner.layers
    kwargs = {
        "attention_mask": None,
        "position_embeddings": rotary,
        "position_ids": positions,
        "use_cache": True,
        "packed": layout,
    }
    with _attention(inner):
        for layer in below:
            out = layer(hidden, **kwargs, **cache_kwargs(layer, cache))
            hidden = out[0] if isinstance(out, tuple) else out
        pick = None if keep is None else lambda states: states[0, keep]
        return last_layer(last, hidden, pick, cache, **kwargs)


def packed_cache(model: nn.Module, batch: DetectionBatch) -> DynamicCache:
    """The steered prefix cache of ``batch`` with packed keys and values ``[1, H, N, D]``,
    under ``no_grad``; read it with :func:`packed_suffix_hidden`."""
    inner = backbone(model)
    lengths = batch.prefix_lens.tolist()
    real = batch.prefix_mask.bool()
    ids = _pack(batch.prefix_ids, real)
    # Left padding: a row's first real token sits at position 0, as it would alone.
    positions = _pack((batch.prefix_mask.cumsum(1) - 1).clamp(min=0), real)
    width = batch.prefix_ids.shape[1]
    steered = position_mask(batch.steerings, lengths, width)[real.cpu()][None]
    rows = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    cache = DynamicCache(config=inner.config)
    with torch.no_grad(), steer(model, batch.steerings, mask=steered, token_rows=rows):
        _run(inner, ids, positions, _layout(lengths, None, ids.device), cache, keep=None)
    return cache


def pack_cache(model: nn.Module, cache: DynamicCache, batch: DetectionBatch) -> DynamicCache:
    """A padded prefix cache of ``batch`` (``[B, H, T, D]`` a layer, as a shared prefix pass
    leaves it) with its real tokens only, row after row (``[1, H, N, D]``), as
    :func:`packed_cache` leaves it: for :func:`packed_suffix_hidden`."""
    real = batch.prefix_mask.bool()
    packed = DynamicCache(config=backbone(model).config)
    for mine, theirs in zip(packed.layers, cache.layers, strict=True):
        # [B, H, T, D] -> [B, T, H, D] -> the real [N, H, D] in row order -> [1, H, N, D]
        keys = theirs.keys.transpose(1, 2)[real].transpose(0, 1)[None]
        values = theirs.values.transpose(1, 2)[real].transpose(0, 1)[None]
        mine.update(keys, values)
    return packed


def packed_suffix_hidden(model: nn.Module, batch: SuffixBatch, cache: DynamicCache) -> torch.Tensor:
    """``[B, d]``: each row's last suffix token after the final norm, read on a
    :func:`packed_cache`; equal to :func:`introspect.detection.suffix_hidden` on the padded
    batch's cache."""
    inner = backbone(model)
    prefix, suffix = batch.prefix_lens.tolist(), batch.suffix_lens.tolist()
    real = batch.suffix_mask.bool()
    ids = _pack(batch.suffix_ids, real)
    width = batch.suffix_ids.shape[1]
    positions = _pack(batch.prefix_lens[:, None] + torch.arange(width, device=ids.device), real)
    layout = _layout(prefix, suffix, ids.device)
    last = _starts(suffix, ids.device) + batch.suffix_lens.to(ids.device) - 1
    return inner.norm(_run(inner, ids, positions, layout, read_only(cache), last))
