"""The steer-then-remove protocol: build the prompt, steer the prefix, ask on the cache.

For one example (DESIGN.md, "The steer-then-remove protocol")::

    prefix = [system?, user: context_prompt, assistant: assistant_response]
    full   = prefix + [user: detection_question, assistant: "The answer is"]

The prefix is read under ``no_grad`` with the steering hooks on; that pass only fills the KV
cache (no LM head). The hooks come off, the suffix is read on the steered cache with gradients
allowed, and only the last suffix position goes through the LM head.

Batching: prefixes are left-padded so they all end at the same column, suffixes right-padded;
position ids are computed per row, so a row's answer does not depend on its batch-mates. Rows
with the same prefix can share the prefix pass below their steered layers
(:mod:`introspect.prefix_share`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from introspect import prefix_share
from introspect.errors import IntrospectError
from introspect.models import backbone, cache_kwargs, causal_lm, output_cache, padded
from introspect.prefix_share import read_only
from introspect.steering import Steering, position_mask, steer

PREFILL = "The answer is"
YES_NO = (" yes", " no")
# The answer pairs a detection question can ask for, (positive, negative). A neutral pair tests
# whether detection rides on the " yes" token itself (a critique of the field: the answer
# tokens' priors drive the effect); its question says which colour means which.
ANSWER_PAIRS: dict[str, tuple[str, str]] = {"yes-no": YES_NO, "red-blue": (" Red", " Blue")}
_ASK = re.compile(r"\s*(please\s+)?answer\s+(with\s+)?yes\s+or\s+no\.?\s*$", re.IGNORECASE)


def ask_for(question: str, answers: str) -> str:
    """``question`` asking for the ``answers`` pair: a yes/no question's closing "Answer yes or
    no." becomes "Answer Red if yes and Blue if no." for the red-blue pair (appended when the
    question has no such sentence)."""
    if answers == "yes-no":
        return question
    if answers not in ANSWER_PAIRS:
        raise IntrospectError(f"answers: {answers!r} is not one of {', '.join(ANSWER_PAIRS)}")
    pos, neg = (a.strip() for a in ANSWER_PAIRS[answers])
    return f"{_ASK.sub('', question).rstrip()} Answer {pos} if yes and {neg} if no."


@dataclass
class DetectionExample:
    """The texts of one trial and its steering (``None`` = unsteered)."""

    context_prompt: str
    assistant_response: str
    detection_question: str
    system_prompt: str | None = None
    steering: Steering | None = None
    answer_tokens: tuple[str, str] = YES_NO


@dataclass
class DetectionPrompt:
    """Token ids of one trial: the steered prefix, the unsteered suffix, and the answer pair."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    answer_ids: tuple[int, int]
    steering: Steering | None = None


@dataclass
class DetectionBatch:
    """Padded tensors for a batch of prompts (prefix left-padded, suffix right-padded)."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    prefix_lens: torch.Tensor
    suffix_lens: torch.Tensor
    answer_ids: torch.Tensor  # [B, 2]: (positive, negative) token ids
    steerings: list[Steering | None] = field(default_factory=list)

    def to(self, device: torch.device) -> DetectionBatch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return DetectionBatch(**tensors, steerings=self.steerings)


def messages(example: DetectionExample, info_prompt: str | None = None) -> tuple[list, list]:
    """The chat messages of the prefix and of the full conversation."""
    context = example.context_prompt
    if info_prompt:
        context = f"{info_prompt}\n\n{context}"
    system = example.system_prompt
    prefix = [] if system is None else [{"role": "system", "content": system}]
    prefix += [
        {"role": "user", "content": context},
        {"role": "assistant", "content": example.assistant_response},
    ]
    full = prefix + [
        {"role": "user", "content": example.detection_question},
        {"role": "assistant", "content": PREFILL},
    ]
    return prefix, full


def answer_token_ids(tokenizer, answer_tokens: tuple[str, ...] = YES_NO) -> tuple[int, ...]:
    """The single token id of each answer; fail loudly when one splits into several tokens."""
    ids = []
    for text in answer_tokens:
        toks = tokenizer.encode(text, add_special_tokens=False)
        if len(toks) != 1:
            raise IntrospectError(
                f"answer_tokens: {text!r} is {len(toks)} tokens for this tokenizer, need exactly 1"
            )
        ids.append(toks[0])
    return tuple(ids)


def build_prompt(
    tokenizer, example: DetectionExample, info_prompt: str | None = None
) -> DetectionPrompt:
    """Tokenise one trial exactly as DESIGN.md says: prefix and suffix tokenised separately."""
    prefix_msgs, full_msgs = messages(example, info_prompt)
    prefix_text = tokenizer.apply_chat_template(prefix_msgs, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        full_msgs, tokenize=False, continue_final_message=True
    )
    if not full_text.startswith(prefix_text):
        raise IntrospectError(
            "chat template: the full conversation does not start with the prefix text, so the "
            "steered prefix cannot be cached; this model's template rewrites earlier turns"
        )
    if not full_text.endswith(PREFILL):
        raise IntrospectError(
            f"chat template: the prompt does not end with the prefill {PREFILL!r}"
        )
    # The chat template already holds any BOS/special tokens, so the tokenizer adds none.
    prefix_ids = tokenizer.encode(prefix_text, add_special_tokens=False)
    suffix_ids = tokenizer.encode(full_text[len(prefix_text) :], add_special_tokens=False)
    return DetectionPrompt(
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        answer_ids=answer_token_ids(tokenizer, example.answer_tokens),
        steering=example.steering,
    )


def collate(prompts: Sequence[DetectionPrompt], pad_id: int) -> DetectionBatch:
    """Pad a list of prompts into one batch."""
    prefix_ids, prefix_mask = padded([p.prefix_ids for p in prompts], pad_id, left=True)
    suffix_ids, suffix_mask = padded([p.suffix_ids for p in prompts], pad_id)
    return DetectionBatch(
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        suffix_ids=suffix_ids,
        suffix_mask=suffix_mask,
        prefix_lens=prefix_mask.sum(1),
        suffix_lens=suffix_mask.sum(1),
        answer_ids=torch.tensor([p.answer_ids for p in prompts], dtype=torch.long),
        steerings=[p.steering for p in prompts],
    )


def steered_cache(model: nn.Module, batch: DetectionBatch, grad: bool = False):
    """Prefix pass under no_grad (``grad``: with autograd) with each row's steering: returns
    the KV cache only."""
    mask = position_mask(batch.steerings, batch.prefix_lens.tolist(), batch.prefix_ids.shape[1])
    # Left padding: a row's first real token sits at position 0, as it would alone.
    positions = (batch.prefix_mask.cumsum(1) - 1).clamp(min=0)
    any_steered = any(s is not None for s in batch.steerings)
    steering = steer(model, batch.steerings, mask=mask) if any_steered else nullcontext()
    inner = backbone(model)
    with torch.set_grad_enabled(grad), steering:
        out = inner(
            input_ids=batch.prefix_ids,
            attention_mask=batch.prefix_mask,
            position_ids=positions,
            use_cache=True,
        )
    return output_cache(inner, out)


def prefix_cache(model: nn.Module, batch: DetectionBatch, share_prefixes: bool = True):
    """The steered prefix cache: :func:`introspect.prefix_share.shared_cache` where the backbone
    supports it and ``share_prefixes``, else :func:`steered_cache`. Both give the same cache."""
    if share_prefixes and prefix_share.supported(model):
        return prefix_share.shared_cache(model, batch)
    return steered_cache(model, batch)


def suffix_hidden(
    model: nn.Module, batch: DetectionBatch, cache, share: bool = False
) -> torch.Tensor:
    """Suffix pass on a (steered) cache: ``[B, d_model]`` final hidden states at each row's last
    suffix token, before the LM head.

    The cache is made read-only (:func:`read_only`) and can be read again afterwards. ``share``:
    rows with the same prefix and suffix run together through their first steered layer
    (:func:`introspect.prefix_share.shared_suffix_hidden`), where the backbone supports it.
    """
    if share and prefix_share.suffix_supported(model):
        return prefix_share.shared_suffix_hidden(model, batch, cache)
    positions = batch.prefix_lens[:, None] + torch.arange(
        batch.suffix_ids.shape[1], device=batch.suffix_ids.device
    )
    attention = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)
    inner = backbone(model)
    hidden = inner(
        input_ids=batch.suffix_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **cache_kwargs(inner, read_only(cache)),
    ).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.suffix_lens - 1]


def suffix_logits(
    model: nn.Module, batch: DetectionBatch, cache, share: bool = False
) -> torch.Tensor:
    """``[B, vocab]`` logits at each row's last suffix token (:func:`suffix_hidden`)."""
    return causal_lm(model).get_output_embeddings()(suffix_hidden(model, batch, cache, share))


def head_rows(model: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``[B, k]`` logits of only the tokens ``token_ids`` (``[B, k]``) from ``[B, d_model]``
    hidden states: the LM head's rows for them, not its whole vocabulary. Equal to
    ``head(hidden).gather(1, token_ids)``."""
    head = causal_lm(model).get_output_embeddings()
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: only calling the head gathers it
        return head(hidden).gather(1, token_ids)
    out = torch.einsum("bd,bkd->bk", hidden, head.weight[token_ids].to(hidden.dtype))
    if getattr(head, "bias", None) is not None:
        out = out + head.bias[token_ids].to(out.dtype)
    return out


def detection_logits(
    model: nn.Module, batch: DetectionBatch, share_prefixes: bool = False
) -> torch.Tensor:
    """The two-pass steer-then-remove forward: ``[B, vocab]`` logits at the answer position.

    ``share_prefixes`` computes rows with the same prefix together below their steered layers
    (:func:`prefix_cache`), and rows with the same prefix and suffix together through the first
    of them (:func:`suffix_logits`); the prefix pass is under ``no_grad`` either way.
    """
    return suffix_logits(model, batch, prefix_cache(model, batch, share_prefixes), share_prefixes)


def answer_probabilities(
    logits: torch.Tensor, answer_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``p_yes`` (2-way softmax over the answer pair) and the pair's raw probability mass."""
    logits = logits.float()
    pair = logits.gather(1, answer_ids)
    p_yes = pair.softmax(-1)[:, 0]
    mass = logits.log_softmax(-1).gather(1, answer_ids).exp().sum(-1)
    return p_yes, mass


LOGIT_STATS = ("entropy", "yes_no_gap", "top1_logprob", "top10_mass", "logsumexp")


def logit_stats(logits: torch.Tensor, answer_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row, statistics of the whole next-token distribution at the answer position (the
    :data:`LOGIT_STATS`): what a probe that reads only the output's shape, not the answer, has
    to go on (the logit-shift baseline of the controls)."""
    logits = logits.float()
    logp = logits.log_softmax(-1)
    pair = logits.gather(1, answer_ids)
    return {
        "entropy": -(logp.exp() * logp).sum(-1),
        "yes_no_gap": pair[:, 0] - pair[:, 1],
        "top1_logprob": logp.max(-1).values,
        "top10_mass": logp.topk(10, -1).values.exp().sum(-1),
        "logsumexp": logits.logsumexp(-1),
    }


def _batch_order(prompt: DetectionPrompt, share_prefixes: bool) -> tuple:
    """Sort key of the trials: by length, so batches carry little padding; for sharing, one
    prefix's trials side by side (by prefix length first, which keeps padding low too)."""
    if not share_prefixes:
        return (len(prompt.prefix_ids) + len(prompt.suffix_ids),)
    leave = math.inf if prompt.steering is None else prompt.steering.layer_start
    return len(prompt.prefix_ids), prompt.prefix_ids, leave, len(prompt.suffix_ids)


@dataclass
class DetectionScores:
    p_yes: list[float]
    yes_no_mass: list[float]
    stats: dict[str, list[float]] = field(default_factory=dict)  # LOGIT_STATS, when asked


def score_detection(
    model: nn.Module,
    tokenizer,
    examples: Sequence[DetectionExample],
    batch_size: int = 16,
    info_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    share_prefixes: bool = True,
    stats: bool = False,
) -> DetectionScores:
    """Score trials in batches; results come back in the input order.

    ``progress(done, total)`` is called before the first batch and after each one, counting the
    distinct trials scored (``total`` can be below ``len(examples)``; see below).

    Trials are grouped by length so batches carry little padding; padding does not change any
    row's answer, so the grouping only changes speed. Unsteered trials with the same tokens
    have the same answer, so each distinct one is scored once and its result shared.

    ``share_prefixes`` (the default) instead orders trials by prefix, so that the steerings of one
    context land in one batch, and runs each batch's distinct prefixes once below the layers where
    their steerings begin (:mod:`introspect.prefix_share`); the answers are the same.

    ``stats``: also each row's :func:`logit_stats`.
    """
    if batch_size < 1:
        raise IntrospectError(f"batch_size: {batch_size} must be >= 1")
    prompts = [build_prompt(tokenizer, ex, info_prompt) for ex in examples]
    first: dict[tuple, int] = {}
    source = list(range(len(prompts)))  # the trial whose score each trial takes
    for i, p in enumerate(prompts):
        if p.steering is None:
            key = (tuple(p.prefix_ids), tuple(p.suffix_ids), p.answer_ids)
            source[i] = first.setdefault(key, i)
    todo = sorted({*source}, key=lambda i: _batch_order(prompts[i], share_prefixes))
    p_yes = [0.0] * len(prompts)
    mass = [0.0] * len(prompts)
    extra = {k: [0.0] * len(prompts) for k in LOGIT_STATS} if stats else {}
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        batch = collate([prompts[i] for i in idx], pad_id).to(device)
        with torch.no_grad():
            logits = detection_logits(model, batch, share_prefixes)
        py, m = answer_probabilities(logits, batch.answer_ids)
        for j, i in enumerate(idx):
            p_yes[i], mass[i] = float(py[j]), float(m[j])
        if stats:
            for k, v in logit_stats(logits, batch.answer_ids).items():
                for j, i in enumerate(idx):
                    extra[k][i] = float(v[j])
        if progress is not None:
            progress(start + len(idx), len(todo))
    for i, s in enumerate(source):
        p_yes[i], mass[i] = p_yes[s], mass[s]
        for values in extra.values():
            values[i] = values[s]
    return DetectionScores(p_yes=p_yes, yes_no_mass=mass, stats=extra)
