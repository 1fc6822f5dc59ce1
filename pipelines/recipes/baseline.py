"""Recipe ``baseline``: the untrained model's P(yes) steered vs unsteered, per layer range ×
magnitude, on balanced trials (each steered trial has an unsteered twin)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from introspect.config import ModelChoice
from introspect.data import Magnitudes


class Config(Magnitudes, ModelChoice):
    vectors: str = Field(description="vector file (.safetensors)")
    n_vectors: int = Field(20, ge=1, description="use the first N vectors")
    info_prompt: bool = Field(False, description="prepend the info prompt")
    batch_size: int = Field(16, ge=1, description="trials per forward pass")
    seed: int = Field(0, description="random seed (texts per trial)")


def run(config: Config, out: Path, context) -> dict:
    from introspect import models
    from introspect.activations import residual_norms
    from introspect.baseline import baseline_table, baseline_trials, markdown_table, write_baseline
    from introspect.data import default_prompts
    from introspect.examples import score_examples
    from introspect.vectors import load_vectors

    lm = models.load(config.model, dtype=config.dtype)
    vs = load_vectors(config.vectors, lm.d_model)
    texts = default_prompts()
    relative = config.magnitude_mode == "relative"
    norms = residual_norms(lm, texts["context_prompts"]) if relative else None
    trials = baseline_trials(
        vs,
        config.n_vectors,
        lm.n_layers,
        texts,
        config.magnitudes,
        config.magnitude_mode,
        norms,
        config.seed,
    )
    info = texts["info_prompt"] if config.info_prompt else None
    scores = score_examples(lm, trials, {vs.name: vs}, config.batch_size, info, context.progress)
    table = baseline_table(scores, lm.n_layers)
    result = write_baseline(out, scores, table, config.model_dump())
    return {"overall": result["overall"], "table": markdown_table(table)}


def summary(metrics: dict, out: Path) -> str:
    o = metrics["overall"]
    return (
        f"{metrics['table']}\noverall: accuracy {o['accuracy']:.3f}, TPR {o['tpr']:.3f}, "
        f"FPR {o['fpr']:.3f}, d′ {o['d_prime']:.2f}, AUROC {o['auroc']:.3f} "
        f"({o['n_steered']} steered / {o['n_unsteered']} unsteered) → {out}"
    )
