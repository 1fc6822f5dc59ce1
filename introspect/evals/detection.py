"""B1 detection evaluation: balanced steered/unsteered trials in three tiers.

* ``in_distribution`` - random vectors the model trained on (rows ``< n_train``);
* ``held_out`` - random vectors it never saw (rows ``>= n_train``);
* ``concepts`` - concept directions (out of distribution).

In every tier each steered trial has an unsteered twin with the same context, reply and question
(the twin carries its partner's layer range and magnitude as a label of the cell; nothing is
applied to it), so the tiers and every layer-range × magnitude cell are balanced. Text triples
are drawn without replacement within a tier, so no two unsteered trials of a tier are identical.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from introspect.config import parse
from introspect.data import (
    Answers,
    Magnitudes,
    absolute_magnitudes,
    default_prompts,
    layer_ranges,
    range_name,
)
from introspect.errors import IntrospectError
from introspect.evals.common import (
    MassFilter,
    ModelConfig,
    Progress,
    in_process,
    load_model,
    model_call,
    model_dims,
    ran_on,
)
from introspect.examples import (
    ask_in,
    examples_frame,
    score_examples,
    twin_rows,
    write_examples,
)
from introspect.io import write_json, write_text
from introspect.metrics import detection_metrics
from introspect.models import LoadedModel
from introspect.vectors import VectorSet

TIERS = ("in_distribution", "held_out", "concepts")


def tier_trials(
    vs: VectorSet,
    rows: range,
    tier: str,
    n_steered: int,
    n_layers: int,
    prompts: dict,
    magnitudes: dict[tuple[int, int], list[float]],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """``n_steered`` steered trials with vectors from ``rows`` of ``vs``, each with a twin."""
    if len(rows) == 0:
        raise IntrospectError(f"vectors: '{vs.name}' has no rows for the {tier} tier")
    triples = list(
        itertools.product(
            prompts["context_prompts"],
            prompts["assistant_responses"],
            prompts["detection_questions"],
        )
    )
    replace = n_steered > len(triples)  # only when asked for more trials than distinct texts
    picks = rng.choice(len(triples), size=n_steered, replace=replace)
    ranges = list(layer_ranges(n_layers).values())
    out = []
    for k in picks:
        context, reply, question = triples[k]
        start, end = ranges[rng.integers(len(ranges))]
        cell_mags = magnitudes[(start, end)]
        magnitude = float(cell_mags[rng.integers(len(cell_mags))])
        idx = int(rows[rng.integers(len(rows))])
        out += twin_rows(
            vs.name, idx, start, end, magnitude, context, reply, question, f"b1-{tier}"
        )
    df = examples_frame(out)
    df["tier"] = tier
    return df


def food_trials(n: int, prompts: dict, rng: np.random.Generator) -> pd.DataFrame:
    """The food-control task: food vs other contexts, label = is about food, nothing steered."""

    def draw(pool: list[str]) -> str:
        return pool[rng.integers(len(pool))]

    rows = []
    for is_food in [True] * (n // 2) + [False] * (n - n // 2):
        pool = prompts["food_context_prompts" if is_food else "context_prompts"]
        rows.append(
            {
                "steered": False,
                "vector_set": "",
                "vector_idx": None,
                "layer_start": 0,
                "layer_end": 0,
                "magnitude": 0.0,
                "context_prompt": draw(pool),
                "assistant_response": draw(prompts["assistant_responses"]),
                "detection_question": prompts["food_question"],
                "system_prompt": None,
                "label": is_food,
                "variant": "b1-food",
            }
        )
    df = examples_frame(rows)
    df["tier"] = "food"
    return df


def detection_trials(
    n_layers: int,
    random_vs: VectorSet,
    concept_vs: VectorSet | None = None,
    n_per_tier: int = 200,
    magnitudes: list[float] | None = None,
    magnitude_mode: str = "absolute",
    norms: list[float] | None = None,
    food: bool = False,
    seed: int = 0,
    prompts: dict | None = None,
) -> pd.DataFrame:
    """All B1 trials: ``n_per_tier`` steered + as many unsteered per tier (+ the food task)."""
    prompts = prompts or default_prompts()
    config = parse(
        Magnitudes,
        {"magnitude_mode": magnitude_mode} | ({"magnitudes": magnitudes} if magnitudes else {}),
    )
    mags = absolute_magnitudes(config, n_layers, norms)
    rng = np.random.default_rng(seed)
    tiers = [
        (random_vs, range(0, random_vs.n_train), "in_distribution"),
        (random_vs, range(random_vs.n_train, random_vs.vectors.shape[0]), "held_out"),
    ]
    if concept_vs is not None:
        tiers.append((concept_vs, range(concept_vs.vectors.shape[0]), "concepts"))
    parts = [
        tier_trials(vs, rows, tier, n_per_tier, n_layers, prompts, mags, rng)
        for vs, rows, tier in tiers
    ]
    if food:
        parts.append(food_trials(2 * n_per_tier, prompts, rng))
    return pd.concat(parts, ignore_index=True)


def _excluded_all() -> dict:
    """A tier's metrics when the mass filter left none of its rows: every figure nan."""
    nan = float("nan")
    figures = ("accuracy", "tpr", "fpr", "d_prime", "auroc")
    out = dict.fromkeys((*figures, "mean_p_yes_steered", "mean_p_yes_unsteered"), nan)
    return out | {"n_steered": 0, "n_unsteered": 0, "ci": {f: [nan, nan] for f in figures}}


def tier_metrics(scores: pd.DataFrame, n_layers: int, min_mass: float = 0.0) -> dict:
    """Per tier: detection metrics with intervals, plus the layer-range × magnitude breakdown.

    Rows whose answer mass (``yes_no_mass``) is under ``min_mass`` are left out of every figure
    and counted per tier (``excluded``, of ``n_rows``)."""
    out: dict = {"tiers": {}, "min_mass": min_mass}
    for tier, all_rows in scores.groupby("tier", sort=False):
        df = all_rows[all_rows["yes_no_mass"] >= min_mass]
        if len(df):
            m = detection_metrics(df["label"].to_numpy(), df["p_yes"].to_numpy()).to_dict()
        else:
            m = _excluded_all()
        m["mean_yes_no_mass"] = float(all_rows["yes_no_mass"].mean())
        m["n_rows"], m["excluded"] = len(all_rows), len(all_rows) - len(df)
        if tier == "food":
            out["food"] = m
            continue
        cells = []
        for (start, end, magnitude), cell in all_rows.groupby(
            ["layer_start", "layer_end", "magnitude"]
        ):
            kept = cell[cell["yes_no_mass"] >= min_mass]
            predicted, label = kept["p_yes"] > 0.5, kept["label"]
            nan = float("nan")
            cells.append(
                {
                    "layers": range_name(n_layers, start, end),
                    "layer_start": int(start),
                    "layer_end": int(end),
                    "magnitude": float(magnitude),
                    "n": len(kept),
                    "excluded": len(cell) - len(kept),
                    "accuracy": float((predicted == label).mean()) if len(kept) else nan,
                    "tpr": float(predicted[label].mean()) if label.any() else nan,
                    "fpr": float(predicted[~label].mean()) if (~label).any() else nan,
                }
            )
        m["cells"] = cells
        out["tiers"][tier] = m
    return out


def evaluate_detection(
    lm: LoadedModel | None,
    trials: pd.DataFrame,
    vector_sets: dict[str, VectorSet],
    batch_size: int = 16,
    info_prompt: str | None = None,
    progress: Progress | None = None,
    mapper=None,
    n_layers: int | None = None,
    min_mass: float = 0.0,
) -> tuple[pd.DataFrame, dict]:
    """Score the trials and compute the per-tier metrics.

    ``mapper(fn, rows, **opts)`` scores them (default: in this process on ``lm``, reporting to
    ``progress(done, total)``; see :func:`introspect.evals.common.in_process`); a mapper that
    holds its own model needs no ``lm``, only ``n_layers``. The per-shard function is
    ``score_examples`` itself. ``min_mass``: see :func:`tier_metrics`."""
    opts = {"vector_sets": vector_sets, "batch_size": batch_size, "info_prompt": info_prompt}
    if mapper is None:  # a pool's mapper shows its own per-shard progress
        mapper, opts["progress"] = in_process(lm), progress
    rows = trials.assign(key=np.arange(len(trials)))
    scores = mapper(score_examples, rows, **opts).drop(columns="key")
    scores["tier"] = trials["tier"].to_numpy()
    return scores, tier_metrics(scores, n_layers or lm.n_layers, min_mass)


def write_detection_eval(
    out: str | os.PathLike, scores: pd.DataFrame, metrics: dict, n_layers: int
) -> None:
    """metrics.json, scores.parquet and the PNG plots (ROC, p_yes histograms, heatmaps)."""
    from introspect import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_examples(scores, out / "scores.parquet")
    detection = scores[scores["tier"] != "food"]
    title = metrics.get("label", "")
    plots.roc_curves(detection, out / "roc.png", title=f"ROC by tier {title}")
    plots.p_yes_histograms(
        detection, out / "p_yes_hist.png", title=f"p_yes steered vs unsteered {title}"
    )
    for tier, m in metrics["tiers"].items():
        plots.range_magnitude_heatmap(
            pd.DataFrame(m["cells"]),
            "accuracy",
            out / f"heatmap_{tier}.png",
            title=f"{tier}: accuracy by layer range × magnitude, {title}",
            center=0.5,
            span=0.5,  # accuracy lies in [0, 1]
        )
    write_json(out / "metrics.json", metrics)


class DetectionEvalConfig(Answers, Magnitudes, MassFilter, ModelConfig):
    """B1 as a plan stage or CLI call sees it. ``magnitudes`` and ``magnitude_mode`` are
    :class:`introspect.data.Magnitudes`, the one definition the training data uses too (relative
    factors are of each layer range's mean residual norm, measured on the base model)."""

    vectors: str = Field(
        description="random vector file: the rows < n_train are the in-distribution tier, the "
        "rest the held-out tier"
    )
    concepts: str | None = Field(
        None, description="concept vector file for the concepts tier (default: no such tier)"
    )
    n_per_tier: int = Field(
        200, ge=1, description="steered trials per tier (each with an unsteered twin)"
    )
    food: bool = Field(False, description="also the food-control task (nothing steered)")
    info_prompt: bool = Field(False, description="prepend the info prompt to every trial")
    batch_size: int = Field(16, ge=1, description="trials per forward pass")
    seed: int = Field(1234, description="seed of the trials drawn")


def run_detection(
    config: DetectionEvalConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """B1 end to end: trials, scores, metrics, plots, ``summary.md``; returns the metrics.

    ``mapper`` scores the trials (as in :func:`evaluate_detection`); with one, no model is
    loaded here: relative magnitudes' residual norms are measured on the mapper's model."""
    from introspect.activations import base_residual_norms
    from introspect.vectors import load_vectors

    cfg = parse(DetectionEvalConfig, config)
    if lm is None and mapper is None:
        lm = load_model(cfg)
    n_layers, d_model = model_dims(cfg, lm)  # with a mapper: the trials need only the shape
    random_vs = load_vectors(cfg.vectors, d_model)
    concept_vs = load_vectors(cfg.concepts, d_model) if cfg.concepts else None
    texts = default_prompts()
    norms = None
    if cfg.magnitude_mode == "relative":
        norms = model_call(cfg, lm, mapper, base_residual_norms, prompts=texts["context_prompts"])
    trials = detection_trials(
        n_layers,
        random_vs,
        concept_vs,
        cfg.n_per_tier,
        cfg.magnitudes,
        cfg.magnitude_mode,
        norms,
        cfg.food,
        cfg.seed,
        texts,
    )
    trials["system_prompt"] = cfg.system_prompt  # every trial's conversation starts with it
    trials = ask_in(trials, cfg.answers)  # the same trials, asked for another pair
    sets = {random_vs.name: random_vs} | ({concept_vs.name: concept_vs} if concept_vs else {})
    info = texts["info_prompt"] if cfg.info_prompt else None
    scores, metrics = evaluate_detection(
        lm, trials, sets, cfg.batch_size, info, progress, mapper, n_layers, cfg.min_mass
    )
    # The settings travel with the numbers ("food" is the food task's metrics, not the flag).
    metrics.update({k: v for k, v in cfg.model_dump().items() if k not in ("label", "food")})
    metrics.update(model_call(cfg, lm, mapper, ran_on))  # the dtype and device it ran in
    metrics["food_task"] = cfg.food
    metrics["label"] = cfg.label or str(cfg.adapter or cfg.model)
    write_detection_eval(out_dir, scores, metrics, n_layers)
    write_text(Path(out_dir) / "summary.md", summary_markdown(metrics))
    return metrics


def summary_markdown(metrics: dict) -> str:
    """B1's results for one model as a Markdown fragment (table + plots)."""
    pair = metrics.get("answers", "yes-no")
    lines = [
        f"### B1 detection: {metrics['label']}"
        + (f" (answers {pair}: P(yes) is P(the first of the pair))" if pair != "yes-no" else ""),
        "",
        "| tier | accuracy [95% CI] | TPR | FPR | d′ | AUROC [95% CI] | n steered/unsteered "
        f"| excluded (mass < {metrics.get('min_mass', 0):g}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(metrics["tiers"].items()) + (
        [("food", metrics["food"])] if "food" in metrics else []
    )
    for tier, m in rows:
        ci = m["ci"]
        lines.append(
            f"| {tier} | {m['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}] "
            f"| {m['tpr']:.3f} | {m['fpr']:.3f} | {m['d_prime']:.2f} "
            f"| {m['auroc']:.3f} [{ci['auroc'][0]:.3f}, {ci['auroc'][1]:.3f}] "
            f"| {m['n_steered']}/{m['n_unsteered']} "
            f"| {m.get('excluded', 0)}/{m.get('n_rows', '')} |"
        )
    lines += ["", "![ROC by tier](roc.png) ![p_yes histograms](p_yes_hist.png)", ""]
    maps = [f"![{t}: layer range × magnitude](heatmap_{t}.png)" for t in metrics["tiers"]]
    lines += [
        "Accuracy per layer range × magnitude (a cell's n counts its steered trials and their "
        "unsteered twins):",
        "",
        " ".join(maps),
        "",
    ]
    return "\n".join(lines) + "\n"
