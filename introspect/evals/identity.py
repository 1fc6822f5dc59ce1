"""B3 identity responses: sampled answers to open questions about the model itself.

Each question of ``resources/evals/identity.json`` is answered ``n_samples`` times (seeded
sampling; temperature, top-p and max_new_tokens are knobs). Responses are saved as JSONL
(question, category, sample, response) and classified with the stance pattern analyser
(:mod:`introspect.stance.patterns`): pattern rates per question category with Wilson intervals.
"""

from __future__ import annotations

import os
from typing import ClassVar

import pandas as pd
from pydantic import Field

from introspect.config import parse, with_system
from introspect.errors import IntrospectError
from introspect.evals.common import (
    FullRun,
    ModelConfig,
    Progress,
    chat_ids,
    finish,
    fmt_rate,
    model_label,
    read_json,
    read_resource,
    row_seed,
    suite_mapper,
)
from introspect.evals.generation import MaxNewTokens, Sampling, Temperature, TopP, generate
from introspect.io import markdown_table
from introspect.models import LoadedModel


class IdentityConfig(FullRun, ModelConfig):
    """B3: sampled answers to open questions about the model itself, classified by stance."""

    FULL: ClassVar[dict] = {"n_samples": 5, "max_new_tokens": 200}

    questions: str | None = Field(
        None,
        description="JSON question file like resources/evals/identity.json "
        "(default: the shipped questions)",
    )
    n_questions: int | None = Field(
        None, ge=1, description="only the first N questions (default: all)"
    )
    n_samples: int = Field(2, ge=1, description="sampled responses per question")
    max_new_tokens: MaxNewTokens = Field(48, description="most tokens per response")
    temperature: Temperature = Field(0.7, description="sampling temperature (0 = greedy)")
    top_p: TopP = Field(0.9, description="nucleus sampling mass")
    seed: int = Field(0, description="sampling seed (each response's seed is derived from it)")
    batch_size: int = Field(32, ge=1, description="prompts generated together")


def identity_trials(data: dict | None = None, n_samples: int = 5, n_questions: int | None = None):
    """One row per (question, sample): ``key``, ``category``, ``question``, ``sample``."""
    data = data or read_resource("identity.json")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise IntrospectError("questions: need an object 'categories' of question lists")
    questions = [
        (cat, i, q)
        for cat, qs in cats.items()
        for i, q in enumerate(qs)
        if isinstance(q, str) and q.strip()
    ]
    questions = questions[:n_questions] if n_questions else questions
    rows = [
        {"key": f"{cat}:{i}:{s}", "category": cat, "question": q, "sample": s}
        for cat, i, q in questions
        for s in range(n_samples)
    ]
    return pd.DataFrame(rows)


def generate_responses(
    lm: LoadedModel,
    shard: pd.DataFrame,
    sampling: Sampling,
    seed: int = 0,
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``response``; each row's sample is seeded by its key."""
    prompts = [
        chat_ids(lm.tokenizer, with_system([{"role": "user", "content": q}], system_prompt))
        for q in shard["question"]
    ]
    seeds = [row_seed(seed, k) for k in shard["key"]]
    texts = generate(lm, prompts, sampling, seeds, batch_size=batch_size)
    return pd.DataFrame({"key": shard["key"].to_numpy(), "response": [t.strip() for t in texts]})


def identity_metrics(results: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict:
    """Pattern rates overall and per category (``write_patterns`` output when ``out_dir`` is
    given: patterns.json and patterns.png there). Empty responses cannot be classified: they
    are counted and left out."""
    from introspect.stance.judges import chosen_judges, judge_flags
    from introspect.stance.patterns import pattern_rates, success_criteria, write_patterns

    rows = [
        {"question": r.question, "category": r.category, "response": r.response}
        for r in results.itertuples()
        if r.response.strip()
    ]
    if not rows:
        raise IntrospectError("responses: every response is empty; nothing to classify")
    flags = judge_flags([r["response"] for r in rows])  # each category by its chosen judge
    rows = [{**r, **f} for r, f in zip(rows, flags, strict=True)]
    if out_dir is not None:
        patterns = write_patterns(rows, out_dir)
    else:
        rates = pattern_rates(rows)
        patterns = {"rates": rates, "criteria": success_criteria(rates)}
    return {
        "n_responses": len(results),
        "n_empty": len(results) - len(rows),
        "mean_words": float(results["response"].str.split().str.len().mean()),
        **patterns,
        "judges": chosen_judges(),
    }


def summary_markdown(metrics: dict, label: str, cfg: IdentityConfig, examples: list) -> str:
    from introspect.stance.judges import judges_line

    rates, overall = metrics["rates"], metrics["rates"]["overall"]
    groups = [(c.replace("_", " "), b["n"], b) for c, b in rates["by_category"].items()]
    rows = [
        {
            "question category": name,
            "n": n,
            "performative (any) [95% CI]": fmt_rate(block["performative_any"]),
            "pragmatic (any) [95% CI]": fmt_rate(block["pragmatic_any"]),
        }
        for name, n, block in [*groups, ("**all**", rates["n"], overall)]
    ]
    top = sorted(
        ((k, v) for k, v in overall.items() if not k.endswith("_any")),
        key=lambda kv: -kv[1]["rate"],
    )[:4]
    common = ", ".join(f"{k.replace('_', ' ')} {v['rate']:.0%}" for k, v in top if v["successes"])
    crit = [
        {
            "criterion": c["criterion"],
            "value": "n/a" if c["value"] is None else f"{c['value']:.2f}",
            "passed": {True: "yes", False: "no", None: "not judged"}[c["passed"]],
        }
        for c in metrics["criteria"]
    ]
    quotes = "\n".join(f"> **{q}** “{' '.join(r.split())[:200]}”\n" for q, r in examples)
    return (
        f"### B3 identity responses: {label}\n\n"
        f"{metrics['n_responses']} responses ({cfg.n_samples} samples per question, temperature "
        f"{cfg.temperature}, top-p {cfg.top_p}, at most {cfg.max_new_tokens} new tokens; "
        f"{metrics['n_empty']} empty, {metrics['mean_words']:.0f} words on average), each "
        f"category decided by its judge ({judges_line(metrics.get('judges'))}). Rates are "
        "fractions of responses, Wilson 95 % intervals.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\nMost frequent patterns: {common or 'none'}.\n\n"
        + markdown_table(crit, ["criterion", "value", "passed"])
        + f"\nSample responses:\n\n{quotes}\n![B3 stance pattern rates](patterns.png)\n"
    )


def run_identity(
    config: IdentityConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage: sample responses, save responses.jsonl, classify, write metrics and summary."""
    cfg = parse(IdentityConfig, config)
    data = read_json(cfg.questions, "questions") if cfg.questions else None
    trials = identity_trials(data, cfg.n_samples, cfg.n_questions)
    responses = suite_mapper(cfg, lm, mapper, progress)(
        generate_responses,
        trials,
        sampling=Sampling.of(cfg),
        seed=cfg.seed,
        system_prompt=cfg.system_prompt,
        batch_size=cfg.batch_size,
    )
    results = trials.merge(responses, on="key")
    metrics = identity_metrics(results, out_dir)
    first = results[results["sample"] == 0].groupby("category", sort=False).head(1)
    examples = list(zip(first["question"], first["response"], strict=True))
    summary = summary_markdown(metrics, model_label(cfg), cfg, examples)
    responses = results[["question", "category", "sample", "response"]]
    return finish(cfg, out_dir, metrics, summary, {"responses.jsonl": responses})
