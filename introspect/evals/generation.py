"""Text generation for the evaluations: batched, seeded per row, optionally steered.

Rows are left-padded into one batch; each row samples with its own generator seeded by the
caller, so a row's text does not depend on which shard or batch it lands in. A row's steering
is applied only while its prompt is read (at the steering's token ``positions``); the generated
tokens read the steered cache unsteered, as in the steer-then-remove protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Annotated

import torch
from pydantic import Field

from introspect.config import Config
from introspect.errors import IntrospectError
from introspect.models import LoadedModel, backbone, cache_kwargs, causal_lm, output_cache
from introspect.steering import Steering, position_mask, steer

# The decoding knobs' constraints, defined once: :class:`Sampling` and the suites' configs that
# expose these knobs (with their own defaults) use the same types.
MaxNewTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]


class Sampling(Config):
    """How to decode: temperature 0 is greedy; ``top_p`` < 1 keeps the smallest nucleus."""

    max_new_tokens: MaxNewTokens = Field(64, description="most tokens generated per row")
    temperature: Temperature = Field(0.0, description="sampling temperature (0 = greedy)")
    top_p: TopP = Field(1.0, description="nucleus sampling mass (1 = the whole distribution)")

    @classmethod
    def of(cls, config) -> Sampling:
        """The sampling knobs of a suite's config (which has fields of these names)."""
        return cls(**{name: getattr(config, name) for name in cls.model_fields})


def _pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """One next token from one row's logits."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        # keep tokens until the mass before them reaches top_p (the first is always kept)
        keep = (sorted_p.cumsum(-1) - sorted_p) < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    seeds: Sequence[int] | None = None,
    steerings: Sequence[Steering | None] | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Decode a continuation of each prompt (token ids), in input order: row ``i`` samples with
    seed ``seeds[i]`` and is steered by ``steerings[i]`` while its prompt is read, at the
    steering's ``positions`` or over the whole prompt (see the module docstring)."""
    if batch_size < 1:
        raise IntrospectError(f"batch_size: {batch_size} must be >= 1")
    seeds = list(seeds) if seeds is not None else [0] * len(prompts)
    steerings = list(steerings) if steerings is not None else [None] * len(prompts)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = getattr(getattr(causal_lm(lm.model), "generation_config", None), "eos_token_id", None)
    stop = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos else [])
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = _generate_batch(
            lm,
            [prompts[i] for i in idx],
            [steerings[i] for i in idx],
            [seeds[i] for i in idx],
            sampling,
            pad,
            stop,
        )
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
    return out


def prefill(lm: LoadedModel, prompts, steerings, pad: int):
    """Read left-padded prompts in one pass, each row's steering on its ``positions`` only.

    Returns the cache, the next-token logits ``[B, vocab]``, the attention mask and the position
    ids. One pass with a position mask gives the same cache and logits as the two-pass
    steer-then-remove protocol with the steered slice as prefix: causal attention means the
    unsteered tail reads the steered positions' keys and values either way.
    """
    model, device = lm.model, lm.device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    forward = backbone(model)
    steering = nullcontext()
    if any(s is not None for s in steerings):
        where = position_mask(steerings, [len(p) for p in prompts], width)
        steering = steer(model, steerings, mask=where)
    with steering:
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits = causal_lm(model).get_output_embeddings()(out.last_hidden_state[:, -1])
    return output_cache(forward, out), logits, mask, positions


def _generate_batch(lm, prompts, steerings, seeds, sampling, pad, stop) -> list[str]:
    device, b = lm.device, len(prompts)
    cache, logits, mask, positions = prefill(lm, prompts, steerings, pad)
    head = causal_lm(lm.model).get_output_embeddings()
    forward = backbone(lm.model)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    new: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    next_pos = positions[:, -1:] + 1
    for _ in range(sampling.max_new_tokens):
        step = []
        for i in range(b):
            t = pad if done[i] else _pick(logits[i], sampling, gens[i])
            if not done[i]:
                if t in stop:
                    done[i] = True
                else:
                    new[i].append(t)
            step.append(t)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        h = forward(
            input_ids=torch.tensor(step, device=device)[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **cache_kwargs(forward, cache),
        )
        cache, logits = output_cache(forward, h), head(h.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
