"""Adding ``magnitude * v`` to decoder-layer outputs, per row of a batch.

A :class:`Steering` says what to add (a unit vector times a magnitude), where in depth (decoder
layers ``[layer_start, layer_end)``) and where in the sequence (a token slice of the steered call,
or all of it). :func:`steer` installs forward hooks for a whole batch in which every row may carry
its own steering or none, and always removes them on exit, also when the body raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from introspect.errors import IntrospectError
from introspect.models import decoder_layers, hidden_size

UNIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Steering:
    """One row's injection: ``magnitude * vector`` added to the outputs of layers [start, end).

    ``positions`` is a token slice ``(start, end)`` of the row's own (unpadded) steered sequence;
    ``None`` steers every position.
    """

    vector: torch.Tensor
    layer_start: int
    layer_end: int
    magnitude: float
    positions: tuple[int, int] | None = None

    def validate(self, n_layers: int, d_model: int) -> None:
        """Raise IntrospectError naming the field when this steering does not fit the model."""
        if self.vector.ndim != 1 or self.vector.shape[0] != d_model:
            raise IntrospectError(
                f"vector: shape {tuple(self.vector.shape)} does not match the model's "
                f"d_model={d_model}; use vectors made for this model (introspect vectors ...)"
            )
        norm = float(self.vector.float().norm())
        if not math.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
            raise IntrospectError(
                f"vector: norm {norm:.4f} is not 1; steering vectors are unit rows"
            )
        if not (0 <= self.layer_start < self.layer_end <= n_layers):
            raise IntrospectError(
                f"layer_start/layer_end: [{self.layer_start}, {self.layer_end}) is outside the "
                f"model's {n_layers} layers; need 0 <= layer_start < layer_end <= {n_layers}"
            )
        if not math.isfinite(self.magnitude):
            raise IntrospectError(f"magnitude: {self.magnitude} is not finite")
        if self.positions is not None and not (0 <= self.positions[0] < self.positions[1]):
            raise IntrospectError(f"positions: {self.positions} is not a token slice (start, end)")


def added(steering: Steering, like: torch.Tensor) -> torch.Tensor:
    """``[d]``: what ``steering`` adds at a steered position, in ``like``'s dtype and device."""
    return (steering.magnitude * steering.vector.detach().float().cpu()).to(like)


def position_mask(
    steerings: Sequence[Steering | None], lengths: Sequence[int], total: int
) -> torch.Tensor:
    """A ``[B, total]`` 0/1 mask of steered positions for a left-padded batch.

    Row ``b`` holds its ``lengths[b]`` real tokens at the right end; a steering's ``positions``
    count from the row's first real token. Padding is never steered.
    """
    mask = torch.zeros(len(lengths), total)
    for b, (s, n) in enumerate(zip(steerings, lengths, strict=True)):
        if s is None:
            continue
        start, end = s.positions if s.positions is not None else (0, n)
        if end > n:
            raise IntrospectError(f"positions: slice {s.positions} is past the row's {n} tokens")
        offset = total - n
        mask[b, offset + start : offset + end] = 1.0
    return mask


@contextmanager
def steer(
    model: nn.Module,
    steerings: Steering | Sequence[Steering | None],
    mask: torch.Tensor | None = None,
    token_rows: torch.Tensor | None = None,
) -> Iterator[None]:
    """Add each row's steering to the decoder-layer outputs of every forward inside the block.

    ``steerings`` is one Steering for all rows, or one entry per batch row (``None`` = unsteered).
    ``mask`` (``[B, T]``) limits the addition to chosen positions (see :func:`position_mask`);
    without it every position of every forward in the block is steered. ``token_rows`` (``[N]``):
    the rows are packed into one sequence of ``N`` tokens (:mod:`introspect.packed`), token ``t``
    of row ``token_rows[t]``; ``mask`` is then ``[1, N]``.
    """
    layers = decoder_layers(model)
    d_model = hidden_size(model)
    param = next(model.parameters())
    single = isinstance(steerings, Steering)
    rows: list[Steering | None] = [steerings] if single else list(steerings)
    for s in rows:
        if s is not None:
            s.validate(len(layers), d_model)

    deltas = torch.zeros(len(rows), d_model, dtype=torch.float32)
    active = torch.zeros(len(layers), len(rows), dtype=torch.float32)
    for b, s in enumerate(rows):
        if s is not None:
            deltas[b] = added(s, deltas)
            active[s.layer_start : s.layer_end, b] = 1.0
    deltas = deltas.to(device=param.device, dtype=param.dtype)
    row_mask = None if mask is None else mask.to(device=param.device, dtype=param.dtype)[:, :, None]

    def make_hook(add: torch.Tensor):  # add: [B, 1, d]
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not single and hidden.shape[0] != add.shape[0]:
                raise IntrospectError(
                    f"steering: {add.shape[0]} row steerings for a batch of {hidden.shape[0]}"
                )
            if row_mask is None:
                hidden = hidden + add
            elif row_mask.shape[:2] != hidden.shape[:2]:
                raise IntrospectError(
                    f"steering: mask {tuple(row_mask.shape[:2])} does not match the hidden states "
                    f"{tuple(hidden.shape[:2])}"
                )
            else:
                hidden = hidden + row_mask * add
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            if active[i].any():
                add = (deltas * active[i].to(deltas)[:, None])[:, None, :]
                if token_rows is not None:  # each packed token gets its row's: [1, N, d]
                    add = add[token_rows.to(add.device)].transpose(0, 1)
                handles.append(layer.register_forward_hook(make_hook(add)))
        yield
    finally:
        for h in handles:
            h.remove()
