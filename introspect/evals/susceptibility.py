"""Steering susceptibility: how far does a concept vector at a fixed strength move the model?

Fonseca Rivera & Africa report that detection-trained models become *more* steerable. This
suite measures steerability the way B6 injects (a concept vector over a neutral exchange, the
injection removed before the model speaks), but asks for free text instead of a report
(``resources/evals/susceptibility.json``), and reads two things per model:

* **the concept judges' rate** - how often the free text names the injected concept (keyword)
  or is nearest to it among the run's concepts (embedding), steered against unsteered twins;
* **KL** - ``KL(p_steered ‖ p_unsteered)`` of the next-token distribution where the answer
  starts, per steered trial and its twin (the same texts), in nats.

Run it on the base model and on a trained one with the same settings: the trials, vectors and
strengths are the same for both, so the report pairs their KLs trial by trial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar

import pandas as pd
import torch
from pydantic import Field

from introspect.config import parse
from introspect.evals.common import (
    Progress,
    figure,
    finish,
    fmt_mean,
    fmt_rate,
    load_model,
    mean_ci,
    model_label,
    read_resource,
    row_steering,
    suite_mapper,
)
from introspect.evals.concepts import (
    ConceptsConfig,
    Embedder,
    answer_concepts,
    concept_metrics,
    concept_trials,
    injection,
    judge,
    steered_chat,
)
from introspect.evals.generation import MaxNewTokens, Sampling, Temperature, prefill
from introspect.io import markdown_table
from introspect.models import LoadedModel


class SusceptibilityConfig(ConceptsConfig):
    """A concept vector at a fixed strength, then free text: judges' rate and next-token KL."""

    FULL: ClassVar[dict] = {"n_concepts": 50, "n_samples": 4}

    n_concepts: int = Field(12, ge=1, description="the first N concepts")
    magnitudes: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0], min_length=1,
        description="fixed injection strengths: factors of the layers' mean residual norm",
    )  # fmt: skip
    n_samples: int = Field(2, ge=1, description="trials per concept and magnitude")
    max_new_tokens: MaxNewTokens = Field(24, description="most tokens of free text")
    temperature: Temperature = Field(0.0, description="sampling temperature (0 = greedy)")


@torch.no_grad()
def next_token_kl(
    lm: LoadedModel,
    shard: pd.DataFrame,
    vectors: torch.Tensor,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Per-shard function over steered rows: ``key``, ``kl`` = KL(steered ‖ unsteered) of the
    next-token distribution at the answer's first position (the twin is the same prompt read
    without the injection, computed here so the pair never spans two shards)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = []
    rows = list(shard.itertuples())
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        prompts, steerings = [], []
        for r in batch:
            ids, n_prefix = steered_chat(lm.tokenizer, r.context, r.reply, r.question,
                                         system_prompt)  # fmt: skip
            prompts.append(ids)
            steerings.append(row_steering(vectors, r, (0, n_prefix)))
        _, steered, _, _ = prefill(lm, prompts, steerings, pad)
        _, plain, _, _ = prefill(lm, prompts, [None] * len(prompts), pad)
        ls, lu = steered.float().log_softmax(-1), plain.float().log_softmax(-1)
        out += (ls.exp() * (ls - lu)).sum(-1).clamp(min=0).tolist()
    return pd.DataFrame({"key": shard["key"].to_numpy(), "kl": out})


def susceptibility_metrics(judged: pd.DataFrame, kl: pd.DataFrame) -> dict:
    """B6's judge rates on the free text, plus the KL's mean (bootstrap interval) overall and
    per magnitude factor."""
    m = concept_metrics(judged)
    k = kl.merge(judged[["key", "factor"]], on="key")
    m["kl"] = mean_ci(k["kl"])
    m["kl_by_factor"] = {f"{f:g}": mean_ci(g["kl"]) for f, g in k.groupby("factor")}
    o = m["overall"]
    m["verdict"] = (
        f"free text names the concept {fmt_rate(o['keyword_steered'])} steered vs "
        f"{fmt_rate(o['keyword_control'])} unsteered (keyword); next-token KL "
        f"{fmt_mean(m['kl'])} nats"
    )
    return m


def summary_markdown(metrics: dict, judged: pd.DataFrame, label: str, layers) -> str:
    def line(name: str, b: dict, kl: dict) -> dict:
        return {"": name, "n": b["n"], "keyword steered": fmt_rate(b["keyword_steered"]),
                "keyword unsteered": fmt_rate(b["keyword_control"]),
                "embedding steered": fmt_rate(b["embedding_steered"]),
                "embedding unsteered": fmt_rate(b["embedding_control"]),
                "KL (nats)": fmt_mean(kl)}  # fmt: skip

    rows = [line("**all**", metrics["overall"], metrics["kl"])]
    rows += [line(f"factor {f}", metrics["by_factor"][f], metrics["kl_by_factor"][f])
             for f in metrics["by_factor"]]  # fmt: skip
    shown = judged[judged["steered"]].head(6)
    quotes = "".join(f"> **{r.concept}** (×{r.factor:g}): “{' '.join(r.response.split())}”\n"
                     for r in shown.itertuples())  # fmt: skip
    return (
        f"### Steering susceptibility: {label}\n\n**{metrics['verdict']}**\n\n"
        f"{metrics['n_concepts']} concepts injected in layers [{layers[0]}, {layers[1]}) over a "
        "neutral exchange, then free text asked for unsteered; each trial has an unsteered twin "
        "(same texts and seed). Wilson intervals for rates, bootstrap for the KL.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\nSteered free text:\n\n{quotes}\n![KL and judge rates](susceptibility.png)\n"
    )


def plot(metrics: dict, judged_kl: pd.DataFrame, path: str | os.PathLike, label: str) -> None:
    """Per-trial KL (dots) and the keyword rates, steered vs unsteered."""
    with figure(path, 1, 2, figsize=(8.5, 3.6)) as (fig, (a, b)):
        a.hist(judged_kl["kl"], bins=20, color="C3", alpha=0.8)
        a.set_xlabel("KL(steered ‖ unsteered), nats")
        a.set_ylabel("trials")
        a.set_title("next-token KL per trial", fontsize=9)
        o = metrics["overall"]
        for i, key in enumerate(("keyword_steered", "keyword_control")):
            r = o[key]
            b.bar(i, r["rate"], 0.6, color=f"C{i}",
                  yerr=[[r["rate"] - r["ci"][0]], [r["ci"][1] - r["rate"]]], capsize=4)  # fmt: skip
        b.set_xticks([0, 1], ["steered", "unsteered"])
        b.set_ylim(0, 1)
        b.set_ylabel("text names the concept")
        fig.suptitle(f"Steering susceptibility: {label}", fontsize=10)


def run_susceptibility(
    config: SusceptibilityConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """The suite end to end: vectors, free text and judges, KL, metrics, plot, summary."""
    cfg = parse(SusceptibilityConfig, config)
    embedder = Embedder(cfg.embedder)
    if lm is None and mapper is None:
        lm = load_model(cfg)
    texts = read_resource("susceptibility.json")
    vs, (start, end), layer, scale = injection(cfg, lm, mapper, texts["contexts"])
    magnitudes = {f: f * scale for f in cfg.magnitudes}
    trials = concept_trials(vs.names, (start, end), magnitudes, cfg.n_samples, texts, cfg.seed)
    run = suite_mapper(cfg, lm, mapper, progress)
    answers = run(answer_concepts, trials, vectors=vs.vectors, sampling=Sampling.of(cfg),
                  seed=cfg.seed, batch_size=cfg.batch_size,
                  system_prompt=cfg.system_prompt)  # fmt: skip
    kl = run(next_token_kl, trials[trials["steered"]], vectors=vs.vectors,
             batch_size=cfg.batch_size, system_prompt=cfg.system_prompt)  # fmt: skip
    judged = judge(trials.merge(answers, on="key"), embedder)
    metrics = susceptibility_metrics(judged, kl)
    label = model_label(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot(metrics, kl, Path(out_dir) / "susceptibility.png", label)
    summary = summary_markdown(metrics, judged, label, (start, end))
    where = {"layers": [start, end], "residual_norm": scale, "layer": layer}
    tables = {"results.parquet": judged.merge(kl, on="key", how="left")}
    return finish(cfg, out_dir, metrics, summary, tables, **where)
