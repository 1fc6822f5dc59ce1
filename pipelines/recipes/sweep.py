"""Recipe ``sweep``: LoRA rank × learning rate on Ray Tune, ASHA on validation loss.

Each trial is a whole training (the ``train`` recipe's preset plus ``overrides``) with the
trial's rank (alpha = 2 r) and learning rate; trials run as many at once as the cluster holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from introspect.config import ModelChoice
from pipelines.recipes.train import Preset, overrides_config
from pipelines.sweep import SweepSettings


class Config(SweepSettings, ModelChoice):
    data: str = Field(description="directory with train.parquet and val.parquet")
    vectors: list[str] = Field(min_length=1, description="vector file(s) the examples refer to")
    preset: Preset = Field("original", description="the training every trial starts from")
    overrides: dict[str, Any] = Field({}, description="training fields over the preset's")
    steps: int | None = Field(None, ge=1, description="optimizer steps per trial (max_steps)")
    use_gpu: bool = Field(False, description="one GPU per training worker")

    @model_validator(mode="after")
    def _overrides(self) -> Config:
        overrides_config(self.preset, self.overrides, "overrides")
        return self


def run(config: Config, out: Path, context) -> dict:
    from introspect.io import markdown_table
    from pipelines.sweep import Sweep, run_sweep
    from pipelines.train_job import TrainJob

    overrides = config.overrides | ({"max_steps": config.steps} if config.steps else {})
    engine = context.train
    job = TrainJob(
        name=engine.name if engine else out.resolve().name,
        model=config.model,
        train_data=str(Path(config.data) / "train.parquet"),
        val_data=str(Path(config.data) / "val.parquet"),
        vectors=[str(Path(v).resolve()) for v in config.vectors],  # trials chdir
        config=overrides_config(config.preset, overrides, "overrides"),
        storage_path=engine.storage_path if engine else str(out / "ray"),
        use_gpu=engine.use_gpu if engine else config.use_gpu,
        cpus_per_worker=engine.cpus_per_worker if engine else 1.0,
        dtype=config.dtype,
        max_failures=engine.max_failures if engine else 2,
    )
    settings = SweepSettings(**config.model_dump(include=set(SweepSettings.model_fields)))
    table = run_sweep(Sweep(job, settings), out)
    best = json.loads((out / "best.json").read_text())
    (out / "summary.md").write_text(
        f"### Sweep `{context.name or out.name}`: LoRA rank × learning rate (ASHA on validation "
        f"loss)\n\n{markdown_table(table)}\nBest: rank {best['lora_r']}, lr {best['lr']:g} "
        f"(validation loss {best['val_loss']:.4f}).\n"
    )
    return {"best": best, "trials": len(table), "table": table.to_string(index=False)}


def summary(metrics: dict, out: Path) -> str:
    return f"{metrics['table']}\nwrote trials.csv, trials.md and best.json to {out}"
