"""Gradient checkpointing that keeps the steered prefix cache.

transformers' own checkpointing (``gradient_checkpointing_enable``) drops the KV cache of every
layer it checkpoints (``use_cache=False``, ``cache=None``), because a layer that writes to the
cache would write twice when the backward pass replays it. Steer-then-remove needs the cache:
the suffix pass must read the steered prefix, or training learns from unsteered prompts.

So the decoder layers are checkpointed here instead, and the suffix pass reads the prefix cache
read-only (:func:`introspect.prefix_share.read_only`): a replayed layer sees the same prefix keys
and values as the first pass, and nothing is appended twice. The prefix pass runs without
gradients, so it is never checkpointed and fills the cache once.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from introspect.models import decoder_layers


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = functools.partial(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_layers(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward pass (training only).

    Bound as a method, so a deep copy of the model checkpoints its own layers. Non-reentrant
    checkpointing: the inputs need not require gradients (LoRA) and keyword arguments, the
    cache among them, pass through.
    """
    for layer in decoder_layers(model):
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    """Whether :func:`checkpoint_layers` has wrapped ``model``'s decoder layers."""
    return any(
        getattr(layer.forward, "__func__", None) is _checkpointed_forward
        for layer in decoder_layers(model)
    )
