"""Behaviour on held-out questions: generate answers, classify their stance, check correctness.

The same questions go to every model (the base and each tuned one), with the chat template
applied and greedy decoding, so before/after differences come from the weights alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from introspect.evals.common import chat_ids
from introspect.evals.generation import Sampling, generate
from introspect.models import LoadedModel
from introspect.stance.corpus import EvalQuestion
from introspect.stance.judges import judge_flags
from introspect.stance.patterns import PERFORMATIVE, PRAGMATIC, normalise


def respond(
    lm: LoadedModel,
    questions: Sequence[EvalQuestion],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """One greedy answer per question: rows ``{question, category, response, flags..., correct}``,
    the flags from each category's chosen judge (:func:`introspect.stance.judges.judge_flags`).

    ``correct`` is None for questions without ``expect`` regexes, else whether one matches the
    normalised (lower-cased) response.
    """
    tok = lm.tokenizer
    prompts = [chat_ids(tok, [{"role": "user", "content": q.question}]) for q in questions]
    was_training = lm.model.training
    lm.model.eval()
    try:
        texts = generate(
            lm, prompts, Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size
        )
    finally:
        lm.model.train(was_training)
    judged = iter(judge_flags([t for t in texts if t.strip()]))
    rows = []
    for q, text in zip(questions, texts, strict=True):
        flags = next(judged) if text.strip() else dict.fromkeys(PERFORMATIVE + PRAGMATIC, False)
        rows.append(
            {
                "question": q.question,
                "category": q.category,
                "response": text,
                **flags,
                "correct": is_correct(text, q.expect) if q.expect else None,
            }
        )
    return rows


def is_correct(response: str, expect: Sequence[str]) -> bool:
    """Whether any of the ``expect`` regexes matches the normalised response."""
    text = normalise(response)
    return any(re.search(p, text) for p in expect)


def correctness(rows: Sequence[dict[str, Any]], category: str) -> float | None:
    """Fraction correct among the rows of ``category`` that have an expected answer."""
    judged = [r["correct"] for r in rows if r["category"] == category and r["correct"] is not None]
    return sum(judged) / len(judged) if judged else None


def pattern_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the shape ``patterns.pattern_rates`` takes, with their judged categories (empty
    responses are dropped, since the judges need text; their count shows up as a smaller n)."""
    keys = ("response", "category", "question", *PERFORMATIVE, *PRAGMATIC)
    return [{k: r[k] for k in keys if k in r} for r in rows if r["response"].strip()]


def paired_change(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], group: str
) -> dict[str, Any]:
    """Did the share of answers showing any ``group`` pattern (performative / pragmatic) change?

    The two models answered the same questions, so the test is paired: McNemar's exact test
    (a two-sided binomial test on the questions that changed). Rows are matched by question.
    """
    from scipy.stats import binomtest

    cats = {"performative": PERFORMATIVE, "pragmatic": PRAGMATIC}[group]
    after_by_q = {r["question"]: r for r in after}
    n = before_n = after_n = lost = gained = 0
    for r0 in before:
        r1 = after_by_q.get(r0["question"])
        if r1 is None:
            continue
        x0, x1 = any(r0[c] for c in cats), any(r1[c] for c in cats)
        n += 1
        before_n, after_n = before_n + x0, after_n + x1
        lost, gained = lost + (x0 and not x1), gained + (x1 and not x0)
    changed = lost + gained
    p = binomtest(min(lost, gained), changed, 0.5).pvalue if changed else 1.0
    return {
        "n": n,
        "before": before_n,
        "after": after_n,
        "lost": lost,
        "gained": gained,
        "p": float(p),
    }
