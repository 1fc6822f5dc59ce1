"""Recipe ``train``: detection finetuning (LoRA or full) from a preset plus overrides.

In a command it trains in this process; in a plan, on Ray Train (``context.train``), with the
same loop. The run directory holds checkpoints, ``log.jsonl``, ``best/``, ``final/``, the
metrics, ``curves.png`` and ``summary.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from introspect.config import ModelChoice
from introspect.train_config import PRESETS, TrainConfig

Preset = Literal["original", "vague-prompt", "r1-minimal", "food-control", "flipped-labels"]
assert set(Preset.__args__) == set(PRESETS)  # one list of presets


class Config(TrainConfig, ModelChoice):
    data: str = Field(description="directory with train.parquet and val.parquet")
    vectors: list[str] = Field(min_length=1, description="vector file(s) the examples refer to")
    preset: Preset = Field(
        "original", description="seed 002's run whose settings fill the fields not given"
    )
    resume: bool = Field(False, description="continue from the run's last checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _preset_values(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset", "original") in PRESETS:
            return {**PRESETS[data.get("preset", "original")], **data}
        return data


def overrides_config(preset: str, overrides: dict, where: str) -> TrainConfig:
    """A preset plus plan overrides, as the training will see it; only training fields may be
    overridden (the model, data and vectors come from the plan)."""
    from introspect.config import parse
    from introspect.errors import IntrospectError

    for key in overrides:
        if key not in TrainConfig.model_fields:
            raise IntrospectError(f"{where}.{key}: unknown key (not a training option)")
    return parse(TrainConfig, {**PRESETS[preset], **overrides}, where)


def run(config: Config, out: Path, context) -> dict:
    if context.train is not None:
        from pipelines.train_job import TrainJob, run_train_job

        engine = context.train
        job = TrainJob(
            name=engine.name,
            model=config.model,
            train_data=str(Path(config.data) / "train.parquet"),
            val_data=str(Path(config.data) / "val.parquet"),
            vectors=config.vectors,
            config=config,
            storage_path=engine.storage_path,
            num_workers=engine.num_workers,
            use_gpu=engine.use_gpu,
            cpus_per_worker=engine.cpus_per_worker,
            dtype=config.dtype,
            max_failures=engine.max_failures,
        )
        metrics = run_train_job(job, out)
    else:
        metrics = _train_here(config, out, context)
    from introspect.io import read_jsonl

    name = context.name or out.name
    training_curves(read_jsonl(out / "log.jsonl"), out / "curves.png", f"training: {name}")
    workers = metrics.get("num_workers", 1)
    wall = f"; wall {metrics['wall_s']:.0f} s on {workers} worker(s)" if "wall_s" in metrics else ""
    (out / "summary.md").write_text(
        f"### Training `{name}` ({config.preset})\n\n"
        f"{metrics['steps']} steps; best validation accuracy {metrics['best_val_accuracy']:.3f} "
        f"(step {metrics['best_step']}), final {metrics['final_val_accuracy']:.3f}{wall}.\n\n"
        "![training curves](curves.png)\n"
    )
    return metrics


def _train_here(config: Config, out: Path, context) -> dict:
    import time

    from introspect import models
    from introspect.examples import read_examples
    from introspect.train import train
    from introspect.vectors import load_vectors

    started = time.time()
    train_df = read_examples(Path(config.data) / "train.parquet")
    val_df = read_examples(Path(config.data) / "val.parquet")
    lm = models.load(config.model, dtype=config.dtype)
    sets = {vs.name: vs for vs in (load_vectors(p, lm.d_model) for p in config.vectors)}
    train(lm, train_df, val_df, sets, config, out, resume=config.resume, progress=context.progress)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = time.time() - started
    return metrics


def training_curves(log: list[dict], path: Path, title: str) -> None:
    """Training and validation loss, and validation accuracy, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1, label="train loss")
    val = [r for r in log if "val_loss" in r]
    a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", color="C2")
    b.set_ylim(0, 1.02)
    b.axhline(0.5, color="grey", ls=":", lw=1)
    b.set_xlabel("step")
    b.set_ylabel("validation accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(metrics: dict, out: Path) -> str:
    return (
        f"{metrics['steps']} steps; best val accuracy {metrics['best_val_accuracy']:.3f} at step "
        f"{metrics['best_step']}; final {metrics['final_val_accuracy']:.3f} → {out}"
    )
