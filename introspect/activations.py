"""Reading the residual stream: last-token activations and per-layer norms.

"Layer ``i``" here always means the output of decoder layer ``i``: the same place a Steering on
layer ``i`` adds to, so a vector read at a layer can be injected back at that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from introspect.errors import IntrospectError
from introspect.logprobs import user_turn_ids
from introspect.models import LoadedModel, backbone, decoder_layers, padded


@torch.no_grad()
def hidden_states(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16):
    """Yield ``(states, mask)`` per batch: ``states`` is ``[n_layers, B, T, d]`` layer outputs.

    The prompts are user turns in the chat template, left-padded so every row ends in the last
    column. Read with forward hooks on the decoder layers rather than ``output_hidden_states``,
    whose last entry has the final norm applied: this way every layer means the same thing.
    """
    layers = decoder_layers(lm.model)
    tok = lm.tokenizer
    rows = [user_turn_ids(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        input_ids, mask = padded(rows[start : start + batch_size], pad, left=True)
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        captured: list[torch.Tensor] = []

        def grab(_module, _inputs, output, captured=captured):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(grab) for layer in layers]
        try:
            backbone(lm.model)(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        finally:
            for h in handles:
                h.remove()
        yield torch.stack(captured), mask


def last_token_activations(
    lm: LoadedModel, prompts: Sequence[str], layer: int, batch_size: int = 16
) -> torch.Tensor:
    """``[N, d_model]`` float32 output of decoder layer ``layer`` at each prompt's last token."""
    batches = hidden_states(lm, prompts, batch_size)
    return torch.cat([states[layer, :, -1].float().cpu() for states, _ in batches])


def residual_norms(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Mean L2 norm of each decoder layer's output over all real tokens of the prompts.

    Used to set steering magnitudes relative to the model's own scale (small models differ).
    The first token is left out: attention-sink tokens carry norms far above the rest.
    """
    total = None
    count = 0.0
    for states, mask in hidden_states(lm, prompts, batch_size):
        m = mask.clone().float()
        first = m.argmax(1)  # left padding: the first real token of each row
        m[torch.arange(m.shape[0]), first] = 0.0
        norms = states.float().norm(dim=-1)  # [L, B, T]
        s = (norms * m).sum(dim=(1, 2))
        total = s if total is None else total + s
        count += float(m.sum())
    return (total / count).cpu().tolist()


def adapter_off(lm: LoadedModel):
    """A context in which ``lm`` runs as its base model: any PEFT adapter switched off (a
    fully fine-tuned model has no base inside it and runs as it is)."""
    disable = getattr(lm.model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


def base_residual_norms(
    lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16
) -> list[float]:
    """Residual norms of the base model, with any PEFT adapter switched off while measuring.

    Relative magnitudes must not depend on the adapter under evaluation, or two models would be
    compared on slightly different trials. (A fully fine-tuned model has no base inside it: its
    own norms are used.)
    """
    with adapter_off(lm):
        return residual_norms(lm, prompts, batch_size)


def layer_activations(
    lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 16
) -> np.ndarray:
    """``[N, len(layers), d_model]`` float32 last-token outputs of the given decoder layers."""
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < lm.n_layers]
    if not layers or bad:
        raise IntrospectError(
            f"layers: {bad or 'none given'} must be a non-empty list within [0, {lm.n_layers})"
        )
    batches = hidden_states(lm, prompts, batch_size)
    return torch.cat([s[layers, :, -1].transpose(0, 1).float().cpu() for s, _ in batches]).numpy()
