"""B3 identity responses: sampled answers to open questions about the model itself.

Each question of ``resources/evals/identity.json`` is answered ``n_samples`` times (seeded
sampling; temperature, top-p and max_new_tokens are knobs). Responses are saved as JSONL
(question, category, sample, response) and classified with the stance pattern analyser
(:mod:`introspect.stance.patterns`): pattern rates per question category with Wilson intervals.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from introspect.errors import IntrospectError
from introspect.evals.common import (
    chat_ids,
    fmt_rate,
    in_process,
    load_model,
    markdown_table,
    model_label,
    parse_config,
    positive,
    read_json,
    read_resource,
    row_seed,
    write_outputs,
)
from introspect.evals.generation import Sampling, generate
from introspect.models import LoadedModel

FULL = {"n_samples": 5, "max_new_tokens": 200}


@dataclass
class IdentityConfig:
    model: str = "smollm2-135m"
    adapter: str | None = None
    label: str | None = None  # the name shown in reports; default: model + adapter
    device: str | None = None
    dtype: str | None = None
    questions: str | None = None  # a JSON file like resources/evals/identity.json
    n_questions: int | None = None  # the first N questions (all when None)
    n_samples: int = 2
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str | None = None
    seed: int = 0
    batch_size: int = 32

    def validate(self) -> None:
        positive(self, "n_samples", "batch_size")
        if self.n_questions is not None:
            positive(self, "n_questions")
        Sampling(self.max_new_tokens, self.temperature, self.top_p).validate()


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
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    prompts = [
        chat_ids(lm.tokenizer, [*system, {"role": "user", "content": q}]) for q in shard["question"]
    ]
    seeds = [row_seed(seed, k) for k in shard["key"]]
    texts = generate(lm, prompts, sampling, seeds, batch_size=batch_size)
    return pd.DataFrame({"key": shard["key"].to_numpy(), "response": [t.strip() for t in texts]})


def identity_metrics(results: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict:
    """Pattern rates overall and per category (``write_patterns`` output when ``out_dir`` is
    given: patterns.json and patterns.png there). Empty responses cannot be classified: they
    are counted and left out."""
    from introspect.stance.patterns import pattern_rates, success_criteria, write_patterns

    rows = [
        {"question": r.question, "category": r.category, "response": r.response}
        for r in results.itertuples()
        if r.response.strip()
    ]
    if not rows:
        raise IntrospectError("responses: every response is empty; nothing to classify")
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
    }


def summary_markdown(metrics: dict, label: str, cfg: IdentityConfig, examples: list) -> str:
    rates = metrics["rates"]
    rows = [
        {
            "question category": cat.replace("_", " "),
            "n": block["n"],
            "performative (any) [95% CI]": fmt_rate(_as_rate(block["performative_any"], block)),
            "pragmatic (any) [95% CI]": fmt_rate(_as_rate(block["pragmatic_any"], block)),
        }
        for cat, block in rates["by_category"].items()
    ]
    overall = rates["overall"]
    rows.append(
        {
            "question category": "**all**",
            "n": rates["n"],
            "performative (any) [95% CI]": fmt_rate(_as_rate(overall["performative_any"], rates)),
            "pragmatic (any) [95% CI]": fmt_rate(_as_rate(overall["pragmatic_any"], rates)),
        }
    )
    top = sorted(
        ((k, v) for k, v in overall.items() if not k.endswith("_any")),
        key=lambda kv: -kv[1]["rate"],
    )[:4]
    common = ", ".join(f"{k.replace('_', ' ')} {v['rate']:.0%}" for k, v in top if v["count"])
    crit = [
        {
            "criterion": c["criterion"],
            "value": "n/a" if c["value"] is None else f"{c['value']:.2f}",
            "passed": {True: "yes", False: "no", None: "not judged"}[c["passed"]],
        }
        for c in metrics["criteria"]
    ]
    quotes = "\n".join(f"> **{q}** “{_one_line(r)[:200]}”\n" for q, r in examples)
    return (
        f"### B3 identity responses: {label}\n\n"
        f"{metrics['n_responses']} responses ({cfg.n_samples} samples per question, temperature "
        f"{cfg.temperature}, top-p {cfg.top_p}, at most {cfg.max_new_tokens} new tokens; "
        f"{metrics['n_empty']} empty, {metrics['mean_words']:.0f} words on average), classified "
        "by the stance pattern analyser. Rates are fractions of responses, Wilson 95 % "
        "intervals.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\nMost frequent patterns: {common or 'none'}.\n\n"
        + markdown_table(crit, ["criterion", "value", "passed"])
        + f"\nSample responses:\n\n{quotes}\n![B3 stance pattern rates](patterns.png)\n"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _as_rate(block: dict, parent: dict) -> dict:
    return {"rate": block["rate"], "n": parent["n"], "ci": block["ci"]}


def run_identity(
    config: dict, out_dir: str | os.PathLike, lm: LoadedModel | None = None, mapper=None
) -> dict:
    """Plan stage: sample responses, save responses.jsonl, classify, write metrics and summary.

    ``mapper`` as in :func:`introspect.evals.behavioral.run_behavioral`."""
    cfg = parse_config(IdentityConfig, config, FULL)
    data = read_json(cfg.questions, "questions") if cfg.questions else None
    trials = identity_trials(data, cfg.n_samples, cfg.n_questions)
    mapper = mapper or in_process(lm or load_model(cfg))
    responses = mapper(
        generate_responses,
        trials,
        sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p),
        seed=cfg.seed,
        system_prompt=cfg.system_prompt,
        batch_size=cfg.batch_size,
    )
    results = trials.merge(responses, on="key")
    out = Path(out_dir)
    metrics = identity_metrics(results, out)
    label = model_label(cfg)
    metrics.update(config=asdict(cfg), label=label)
    first = results[results["sample"] == 0].groupby("category", sort=False).head(1)
    examples = list(zip(first["question"], first["response"], strict=True))
    responses = results[["question", "category", "sample", "response"]]
    return write_outputs(
        out,
        metrics,
        summary_markdown(metrics, label, cfg, examples),
        {"responses.jsonl": responses},
    )
