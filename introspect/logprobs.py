"""Scoring given answers: the summed log-probability of a continuation after a prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from introspect.errors import IntrospectError
from introspect.models import LoadedModel, backbone, causal_lm, padded


def user_turn_ids(tokenizer, prompt: str) -> list[int]:
    """A user turn in the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)  # the template holds any BOS


@torch.no_grad()
def continuation_logprobs(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
    chat: bool = True,
) -> list[float]:
    """Sum of log p(continuation tokens | prompt) for each pair, in float32.

    With ``chat`` the prompt is a user turn and the continuation starts the assistant's reply.
    Prompt and continuation are tokenised separately (the usual convention for scoring answers),
    so the continuation's first token is what the tokenizer gives for it on its own.
    """
    if len(prompts) != len(continuations):
        raise IntrospectError(
            f"continuations: {len(continuations)} given for {len(prompts)} prompts, need one each"
        )
    if batch_size < 1:
        raise IntrospectError(f"batch_size: {batch_size} must be >= 1")
    tok = lm.tokenizer
    rows = []
    for i, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        ctx_ids = user_turn_ids(tok, prompt) if chat else tok.encode(prompt)
        cont_ids = tok.encode(cont, add_special_tokens=False)
        if not ctx_ids or not cont_ids:
            raise IntrospectError(f"continuations: pair {i} has an empty prompt or continuation")
        rows.append((ctx_ids, cont_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    head = causal_lm(lm.model).get_output_embeddings()
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # Right padding: real tokens keep positions 0..n-1.
        ids, mask = padded([c + x for c, x in chunk], pad)
        hidden = backbone(lm.model)(
            input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)
        ).last_hidden_state
        for j, (c, x) in enumerate(chunk):
            # Only the positions that predict continuation tokens go through the LM head.
            logits = head(hidden[j, len(c) - 1 : len(c) + len(x) - 1]).float()
            target = torch.tensor(x, device=logits.device)
            out.append(float(logits.log_softmax(-1).gather(1, target[:, None]).sum()))
    return out
