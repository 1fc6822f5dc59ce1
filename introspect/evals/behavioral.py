"""B2 behavioural log-probs: how readily does the model say "yes" about its own mind?

Each yes/no question (``resources/evals/behavioral.json``) is asked in the chat template with the
detection prompt's prefill ("The answer is"); P(yes) is the 2-way softmax over the " yes" and
" no" answer tokens, and the two tokens' raw mass shows whether the prompt leads to an answer at
all. Categories: self-attribution of awareness, feelings and introspective ability, and controls
about the world and about other systems (the controls carry their true answer, so their accuracy
checks that the prompt works).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from pydantic import Field

from introspect.config import parse
from introspect.detection import YES_NO
from introspect.errors import IntrospectError
from introspect.evals.common import (
    MassFilter,
    ModelConfig,
    Progress,
    bar_chart,
    finish,
    fmt_mean,
    fmt_rate,
    mean_ci,
    model_label,
    question_prompt,
    rate,
    read_json,
    read_resource,
    score_choices,
    suite_mapper,
)
from introspect.io import markdown_table
from introspect.metrics import auroc
from introspect.models import LoadedModel


class BehavioralConfig(MassFilter, ModelConfig):
    """B2: P(yes) on yes/no questions about the model itself, and on controls."""

    questions: str | None = Field(
        None,
        description="JSON question file like resources/evals/behavioral.json "
        "(default: the shipped questions)",
    )
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")


def behavioral_trials(data: dict | None = None) -> pd.DataFrame:
    """One row per question: ``key``, ``category``, ``question``, ``truth`` (yes/no or None)."""
    data = data or read_resource("behavioral.json")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise IntrospectError("questions: need an object 'categories' of question lists")
    truth = data.get("truth", {})
    rows = []
    for cat, questions in cats.items():
        answers = truth.get(cat)
        if answers is not None and len(answers) != len(questions):
            raise IntrospectError(f"questions: 'truth.{cat}' must have one answer per question")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise IntrospectError(f"questions: '{cat}' item {i} must be a non-empty string")
            t = None if answers is None else answers[i]
            if t not in (None, "yes", "no"):
                raise IntrospectError(f"questions: truth {t!r} of '{cat}' item {i} is not yes/no")
            rows.append({"key": f"{cat}:{i}", "category": cat, "question": q, "truth": t})
    return pd.DataFrame(rows)


def score_behavioral(
    lm: LoadedModel, shard: pd.DataFrame, system_prompt: str | None = None, batch_size: int = 16
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``p_yes``, ``yes_no_mass`` for each question."""
    prompts = [question_prompt(lm.tokenizer, q, YES_NO, system_prompt) for q in shard["question"]]
    probs, mass = score_choices(lm, prompts, batch_size)
    return pd.DataFrame(
        {"key": shard["key"].to_numpy(), "p_yes": [p[0] for p in probs], "yes_no_mass": mass}
    )


def behavioral_metrics(results: pd.DataFrame, min_mass: float = 0.0) -> dict:
    """Per category: mean P(yes) (bootstrap interval over questions), the fraction of questions
    answered yes (P(yes) > 0.5, Wilson interval), the mean answer-token mass, and for categories
    with true answers the accuracy. Questions whose yes+no mass is under ``min_mass`` are left
    out of every figure but the mass and counted (``excluded``; ``n`` counts the kept ones)."""
    cats = []
    for cat, all_rows in results.groupby("category", sort=False):
        df = all_rows[all_rows["yes_no_mass"] >= min_mass]
        said_yes = df["p_yes"] > 0.5
        row = {
            "category": cat,
            "n": len(df),
            "excluded": len(all_rows) - len(df),
            "p_yes": mean_ci(df["p_yes"].tolist()),
            "yes_rate": rate(int(said_yes.sum()), len(df)),
            "mean_yes_no_mass": float(all_rows["yes_no_mass"].mean()),
        }
        if len(df) and df["truth"].notna().all():
            true_yes = (df["truth"] == "yes").to_numpy()
            row["accuracy"] = rate(int((said_yes.to_numpy() == true_yes).sum()), len(df))
            # threshold-free: does P(yes) rank the true-yes questions above the true-no ones?
            p = df["p_yes"].to_numpy()
            row["auroc"] = auroc(p[true_yes], p[~true_yes])
        cats.append(row)
    return {"n_questions": len(results), "min_mass": min_mass, "categories": cats}


def category_table(metrics: dict, label: str = "") -> pd.DataFrame:
    """The per-category results as a tidy table (one row per model × category), for reports
    that compare models."""
    return pd.DataFrame(
        [
            {
                "model": label,
                "category": c["category"],
                "n": c["n"],
                "excluded": c.get("excluded", 0),
                "p_yes": c["p_yes"]["mean"],
                "p_yes_lo": c["p_yes"]["ci"][0],
                "p_yes_hi": c["p_yes"]["ci"][1],
                "yes_rate": c["yes_rate"]["rate"],
                "accuracy": c.get("accuracy", {}).get("rate"),
                "auroc": c.get("auroc"),
                "yes_no_mass": c["mean_yes_no_mass"],
            }
            for c in metrics["categories"]
        ]
    )


def summary_markdown(metrics: dict, label: str) -> str:
    rows = [
        {
            "category": c["category"].replace("_", " "),
            "n": c["n"],
            "mean P(yes) [95% CI]": fmt_mean(c["p_yes"]),
            "answers yes [95% CI]": fmt_rate(c["yes_rate"]),
            "accuracy (controls)": fmt_rate(c["accuracy"]) if "accuracy" in c else "",
            "AUROC (controls)": f"{c['auroc']:.2f}" if "auroc" in c else "",
            "yes+no mass": f"{c['mean_yes_no_mass']:.2f}",
            f"excluded (mass < {metrics.get('min_mass', 0):g})": c.get("excluded", 0),
        }
        for c in metrics["categories"]
    ]
    cols = list(rows[0])
    cats = {c["category"]: c for c in metrics["categories"]}
    self_p = [c["p_yes"]["mean"] for k, c in cats.items() if k.startswith("self") and c["n"]]
    verdict = ""
    if self_p:
        verdict = (
            f"Mean P(yes) over the self-attribution categories is {sum(self_p) / len(self_p):.3f}. "
        )
    acc = [c["accuracy"] for c in metrics["categories"] if "accuracy" in c]
    if acc:
        ok = sum(a["successes"] for a in acc)
        n = sum(a["n"] for a in acc)
        verdict += (
            f"On the controls with known answers the model is right on {ok}/{n} questions "
            f"({ok / n:.0%}) at the 0.5 threshold; the AUROC column says whether P(yes) at least "
            "ranks true-yes above true-no questions (0.5 = no better than chance)."
        )
    return (
        f"### B2 behavioural log-probs: {label}\n\n"
        "P(yes) = softmax over the ' yes'/' no' logits after the chat template and the prefill "
        "'The answer is'. Intervals: bootstrap over questions (mean P(yes)), Wilson (rates). "
        f"Questions whose yes+no mass is under {metrics.get('min_mass', 0):g} are left out of "
        "every column but the mass (n counts the kept ones).\n\n"
        + markdown_table(rows, cols)
        + f"\n{verdict}\n\n![B2 P(yes) by category](behavioral.png)\n"
    )


def run_behavioral(
    config: BehavioralConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage: score every question, write results, metrics.json, summary.md, the plot."""
    cfg = parse(BehavioralConfig, config)
    trials = behavioral_trials(read_json(cfg.questions, "questions") if cfg.questions else None)
    mapper = suite_mapper(cfg, lm, mapper, progress)
    scores = mapper(
        score_behavioral, trials, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size
    )
    results = trials.merge(scores, on="key")
    results["kept"] = results["yes_no_mass"] >= cfg.min_mass
    metrics = behavioral_metrics(results, cfg.min_mass)
    label = model_label(cfg)
    cats = metrics["categories"]
    bar_chart(
        [c["category"] for c in cats],
        [c["p_yes"]["mean"] for c in cats],
        [c["p_yes"]["ci"] for c in cats],
        Path(out_dir) / "behavioral.png",
        title=f"B2: P(yes) by category, {label} (bars: mean, 95% CI; dots: questions)",
        ylabel="P(yes)",
        reference=0.5,
        points=[
            results.loc[(results.category == c["category"]) & results.kept, "p_yes"].tolist()
            for c in cats
        ],
    )
    tables = {"results.parquet": results, "categories.parquet": category_table(metrics, label)}
    return finish(cfg, out_dir, metrics, summary_markdown(metrics, label), tables)
