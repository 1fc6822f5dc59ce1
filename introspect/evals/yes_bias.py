"""Yes-bias control: does steering raise P(yes) on questions that have nothing to do with it?

A critique of steering-detection results (Hahami et al. 2025; Sridharan, "Introspection or
entropy?") is that "detection" can be a global shift of the logits toward "yes": steering
disturbs the cache, and a disturbed model says "yes" to whatever it is asked. This suite asks
control questions over the same steered caches that B1 asks its detection question over:
factual questions whose answer is yes, factual questions whose answer is no, and absurd ones
(no sensible "yes"), ``resources/evals/yes_bias.json``. Each steered trial has an unsteered twin
with the same context, reply and question, so the change in P(yes) is measured pair by pair.

A model that detects steering *and* keeps its answers to these questions shows no shift here;
a model whose detection is a yes-shift shows it on the "no" questions most of all.

Over the same rows it also asks whether the output after an unrelated question gives the
steering away at all: from P(yes) alone, and from the whole next-token distribution's shape
(:mod:`introspect.logit_probe`, the logit-shift baseline).

Rows whose yes+no probability mass is under ``min_mass`` (the prompt or the vector broke the
model's answer) are counted, reported and left out of every rate; a pair counts only when both
its rows are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from introspect.config import parse
from introspect.data import (
    Magnitudes,
    default_prompts,
    layer_ranges,
    range_name,
)
from introspect.detection import LOGIT_STATS
from introspect.errors import IntrospectError
from introspect.evals.behavioral import behavioral_trials
from introspect.evals.common import (
    MassFilter,
    ModelConfig,
    Progress,
    figure,
    finish,
    fmt_mean,
    fmt_rate,
    held_out_rows,
    held_out_steering,
    mean_ci,
    rate,
    read_json,
    read_resource,
    suite_mapper,
    whiskers,
)
from introspect.examples import examples_frame, score_examples, twin_rows
from introspect.io import markdown_table
from introspect.logit_probe import probe_auroc
from introspect.metrics import _auroc_stat, auroc, bootstrap_ci
from introspect.models import LoadedModel
from introspect.vectors import VectorSet

ASK = " Answer yes or no."
NO_QUESTIONS = ("factual_no", "absurd")  # where a rise in P(yes) is a wrong answer


class YesBiasConfig(Magnitudes, MassFilter, ModelConfig):
    """Control questions over steered and unsteered caches: the change in P(yes)."""

    vectors: str = Field(
        description="random vector file; its held-out rows (>= n_train) steer, or all rows "
        "when it has none held out"
    )
    questions: str | None = Field(
        None,
        description="JSON question file like resources/evals/yes_bias.json (default: the "
        "shipped 36 factual-yes, 36 factual-no and 36 absurd questions)",
    )
    n_per_question: int = Field(
        4, ge=1, description="steered trials per question, each with an unsteered twin"
    )
    batch_size: int = Field(16, ge=1, description="trials per forward pass")
    seed: int = Field(1234, description="seed of the trials drawn")


def yes_bias_trials(
    vs: VectorSet,
    n_layers: int,
    questions: pd.DataFrame,
    n_per_question: int,
    magnitudes: dict[tuple[int, int], list[float]],
    seed: int = 0,
    prompts: dict | None = None,
) -> pd.DataFrame:
    """Per question, ``n_per_question`` steered trials (random context, reply, held-out vector,
    layer range and magnitude) each with its unsteered twin; ``pair`` ties the two."""
    prompts = prompts or default_prompts()
    rng = np.random.default_rng(seed)
    rows = held_out_rows(vs)
    ranges = list(layer_ranges(n_layers).values())
    out, meta = [], []
    for q in questions.itertuples(index=False):
        for _ in range(n_per_question):
            start, end = ranges[rng.integers(len(ranges))]
            mags = magnitudes[(start, end)]
            pair = twin_rows(
                vs.name,
                int(rows[rng.integers(len(rows))]),
                start,
                end,
                float(mags[rng.integers(len(mags))]),
                prompts["context_prompts"][rng.integers(len(prompts["context_prompts"]))],
                prompts["assistant_responses"][rng.integers(len(prompts["assistant_responses"]))],
                q.question.rstrip() + ASK,
                "yes-bias",
            )
            meta += [(q.key, q.category, q.truth, len(out) // 2)] * len(pair)
            out += pair
    df = examples_frame(out)
    df[["question_key", "category", "truth", "pair"]] = pd.DataFrame(meta, index=df.index)
    side = np.where(df["steered"], "s", "u")
    df["key"] = df["question_key"] + ":" + df["pair"].astype(str) + ":" + side
    return df


def _block(df: pd.DataFrame) -> dict:
    """P(yes) mean, says-yes rate and (where the truth is known) accuracy of kept rows."""
    says = df["p_yes"] > 0.5
    out = {"p_yes": mean_ci(df["p_yes"]), "says_yes": rate(int(says.sum()), len(df))}
    known = df["truth"].notna()
    correct = says[known] == (df.loc[known, "truth"] == "yes")
    out["correct"] = rate(int(correct.sum()), int(known.sum()))
    return out


def yes_bias_metrics(scores: pd.DataFrame, min_mass: float, n_layers: int) -> dict:
    """Per question category and per layer range: P(yes) unsteered vs steered, the paired change
    ``delta`` (steered minus its twin) with a bootstrap interval, and the rows the mass filter
    excluded."""
    kept = scores["yes_no_mass"] >= min_mass
    df = scores.assign(kept=kept)
    both = df.groupby("pair")["kept"].transform("all")  # a pair counts when both rows do
    s = df[both & df["steered"]].set_index("pair")
    u = df[both & ~df["steered"]].set_index("pair")
    deltas = (s["p_yes"] - u["p_yes"]).rename("delta").to_frame()
    deltas = deltas.join(s[["category", "layer_start", "layer_end"]])

    def summary(rows: pd.DataFrame, pairs: pd.DataFrame) -> dict:
        return {
            "unsteered": _block(rows[~rows["steered"] & rows["kept"]]),
            "steered": _block(rows[rows["steered"] & rows["kept"]]),
            "delta": mean_ci(pairs["delta"]),
            "n_pairs": len(pairs),
            "excluded": {
                "unsteered": int((~rows["steered"] & ~rows["kept"]).sum()),
                "steered": int((rows["steered"] & ~rows["kept"]).sum()),
            },
        }

    out: dict = {"min_mass": min_mass, "n_rows": len(df), "categories": {}, "layers": {}}
    for cat, rows in df.groupby("category", sort=False):
        out["categories"][cat] = summary(rows, deltas[deltas["category"] == cat])
    for (start, end), rows in df.groupby(["layer_start", "layer_end"]):
        at = (deltas["layer_start"] == start) & (deltas["layer_end"] == end)
        out["layers"][range_name(n_layers, start, end)] = summary(rows, deltas[at])
    out["overall"] = summary(df, deltas)
    out["excluded"] = int((~kept).sum())
    # Does the output after an unrelated question give the steering away? The answer alone
    # (P(yes)), then the whole distribution's shape (the logit-shift probe), kept rows only.
    k = df[kept]
    y = k["steered"].to_numpy(bool)
    lo, hi = bootstrap_ci(_auroc_stat, y, k["p_yes"].to_numpy(float))
    out["p_yes_auroc"] = {"auroc": auroc(k["p_yes"][y], k["p_yes"][~y]), "ci": [lo, hi]}
    if set(LOGIT_STATS) <= set(k.columns):
        out["logit_probe"] = probe_auroc(k[list(LOGIT_STATS)], y, k["question_key"].to_numpy())
    out["verdict"] = verdict(out)
    return out


def verdict(metrics: dict) -> str:
    """One line: whether steering shifts P(yes) upward on questions whose answer is no (not
    measurable when the mass filter leaves fewer than two pairs in every such category)."""
    paired = [metrics["categories"].get(c, {}).get("delta") for c in NO_QUESTIONS]
    if not any(d and d["n"] >= 2 for d in paired):
        return (
            f"not measurable: under two steered/unsteered pairs pass the mass filter in "
            f"{' and '.join(NO_QUESTIONS)} ({metrics['excluded']} rows excluded)"
        )
    shifted = []
    for cat in NO_QUESTIONS:
        d = metrics["categories"].get(cat, {}).get("delta")
        if d and d["n"] >= 2 and d["ci"][0] > 0:
            shifted.append(f"{cat} {fmt_mean(d)}")
    if shifted:
        return "yes-shift: steering raises P(yes) where the answer is no (" + "; ".join(
            shifted) + ")"  # fmt: skip
    parts = [
        f"{c} {fmt_mean(metrics['categories'][c]['delta'])}"
        for c in NO_QUESTIONS
        if c in metrics["categories"]
    ]
    return "no yes-shift: ΔP(yes) on questions whose answer is no: " + "; ".join(parts)


def summary_markdown(metrics: dict) -> str:
    """The suite's results for one model as a Markdown fragment (tables + plot)."""

    def row(name: str, m: dict) -> list[str]:
        ex = m["excluded"]
        return [
            name.replace("_", " "),
            str(m["n_pairs"]),
            fmt_mean(m["unsteered"]["p_yes"]),
            fmt_mean(m["steered"]["p_yes"]),
            fmt_mean(m["delta"]),
            f"{fmt_rate(m['unsteered']['correct'])} → {fmt_rate(m['steered']['correct'])}",
            f"{ex['unsteered']} / {ex['steered']}",
        ]

    head = ["questions", "pairs kept", "P(yes) unsteered", "P(yes) steered",
            "Δ P(yes), paired [95% CI]", "correct: unsteered → steered",
            f"excluded (mass < {metrics['min_mass']:g}) u / s"]  # fmt: skip
    cats = [row(c, m) for c, m in metrics["categories"].items()] + [row("all", metrics["overall"])]
    layers = [row(name, m) for name, m in metrics["layers"].items()]

    def table(rows: list[list[str]]) -> str:
        return markdown_table([dict(zip(head, r, strict=True)) for r in rows], head)

    reads = ""
    if "logit_probe" in metrics:
        probe, py = metrics["logit_probe"], metrics["p_yes_auroc"]
        reads = (
            "Telling a steered cache from its unsteered twin after these unrelated questions "
            f"(kept rows, n = {probe['n']}): from P(yes) alone AUROC {_auc(py)}; from the whole "
            f"next-token distribution ({', '.join(probe['features'])}; logistic regression, "
            f"{probe['folds']} folds grouped by question) AUROC {_auc(probe)}. Compare the "
            "model's own detection AUROC (B1) on the same kind of steering.\n\n"
        )
    return (
        f"### Yes-bias control: {metrics['label']}\n\n"
        f"**{metrics['verdict']}**\n\n"
        + reads
        + table(cats)
        + "\nBy the steered layer range (all questions):\n\n"
        + table(layers)
        + "\n![P(yes) unsteered vs steered per question type](yes_bias.png)\n"
    )


def _auc(m: dict) -> str:
    if not np.isfinite(m["auroc"]):
        return "n/a"
    return f"{m['auroc']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def plot(metrics: dict, path: str | os.PathLike) -> None:
    """P(yes) of unsteered and steered rows per question category, with 95 % intervals."""
    cats = list(metrics["categories"])
    x = np.arange(len(cats))
    with figure(path, figsize=(max(5.0, 1.6 * len(cats) + 2.0), 4.0)) as (fig, ax):
        for i, side in enumerate(("unsteered", "steered")):
            blocks = [metrics["categories"][c][side]["p_yes"] for c in cats]
            vals = [b["mean"] for b in blocks]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=side, color=f"C{i}", alpha=0.8,
                   yerr=whiskers(vals, [b["ci"] for b in blocks]), capsize=4)  # fmt: skip
        ax.set_xticks(x, [c.replace("_", " ") for c in cats])
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean P(yes)")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
        ax.set_title(f"Yes-bias control: {metrics['label']}", fontsize=10)


def run_yes_bias(
    config: YesBiasConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """The control end to end: trials, scores, metrics, plot, ``summary.md``; returns the
    metrics. ``mapper`` scores the trials over model hosts, as B1's does."""
    cfg = parse(YesBiasConfig, config)
    questions = behavioral_trials(
        read_json(cfg.questions, "questions") if cfg.questions else read_resource("yes_bias.json")
    )
    if questions["truth"].isna().all():
        raise IntrospectError("questions: no category has a 'truth' list")
    n_layers, vs, texts, mags = held_out_steering(cfg, lm, mapper)
    trials = yes_bias_trials(vs, n_layers, questions, cfg.n_per_question, mags, cfg.seed, texts)
    trials["system_prompt"] = cfg.system_prompt
    run = suite_mapper(cfg, lm, mapper, progress)
    scores = run(
        score_examples, trials, vector_sets={vs.name: vs}, batch_size=cfg.batch_size, stats=True
    )
    cols = ["key", "p_yes", "yes_no_mass", *LOGIT_STATS]
    scores = trials.merge(scores[cols], on="key", validate="1:1")
    metrics = yes_bias_metrics(scores, cfg.min_mass, n_layers)
    metrics["label"] = cfg.label or str(cfg.adapter or cfg.model)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot(metrics, Path(out_dir) / "yes_bias.png")
    return finish(cfg, out_dir, metrics, summary_markdown(metrics), {"scores.parquet": scores})
