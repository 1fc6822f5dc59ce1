"""LoRA rank × learning-rate sweeps with Ray Tune and ASHA on validation loss.

Train V2's pattern: a Tune trial is a small driver function that builds a ``TorchTrainer`` (here
through :func:`pipelines.train_job.run_train_job`) and forwards its reports to Tune with
``TuneReportCallback``; ASHA stops trials whose validation loss lags. Trials run concurrently up
to what the cluster holds (one trial's workers each need a GPU on a GPU cluster).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field

from introspect.config import Config
from introspect.errors import IntrospectError
from introspect.io import markdown_table, write_json, write_text
from pipelines.concurrent import job_capacity
from pipelines.failures import failure_line
from pipelines.train_job import TrainJob, job_datasets, run_train_job


class SweepSettings(Config):
    """What a rank × learning-rate sweep tries and how ASHA prunes it."""

    lora_r: list[Annotated[int, Field(ge=1)]] = Field(
        [4, 16], min_length=1, description="LoRA ranks (alpha = 2 r)"
    )
    lr: list[Annotated[float, Field(gt=0)]] = Field(
        [1e-4, 5e-4], min_length=1, description="peak learning rates"
    )
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every pair; random: num_samples draws from the lists"
    )
    num_samples: int = Field(4, ge=1, description="random search: trials drawn")
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can stop")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1 in this many per rung")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once (default: what the cluster holds)"
    )


@dataclass
class Sweep:
    """A search around a base job."""

    job: TrainJob
    settings: SweepSettings = field(default_factory=SweepSettings)

    def check(self) -> None:
        """What the settings cannot say alone: checked once, before any trial starts."""
        if self.job.config.method != "lora":
            raise IntrospectError("method: a rank sweep needs method 'lora'")
        for path in [self.job.train_data, self.job.val_data, *self.job.vectors]:
            if "://" not in path and not Path(path).exists():
                raise IntrospectError(f"data: {path} does not exist")


def _trial(params: dict, sweep: Sweep, out: str, datasets: dict) -> None:
    """One Tune trial: a whole training job with this trial's rank and learning rate."""
    from ray.tune.integration.ray_train import TuneReportCallback

    r, lr = int(params["lora_r"]), float(params["lr"])
    name = f"{sweep.job.name}-r{r}-lr{lr:g}"
    # Every report must carry the metric ASHA reads: evaluate at every checkpoint.
    update = {"lora_r": r, "lora_alpha": 2 * r, "lr": lr, "save_every": sweep.job.config.eval_every}
    job = replace(sweep.job, name=name, config=sweep.job.config.model_copy(update=update))
    run_train_job(
        job, Path(out) / "trials" / name, callbacks=[TuneReportCallback()], datasets=datasets
    )


def run_sweep(sweep: Sweep, out: str | os.PathLike) -> pd.DataFrame:
    """Run the sweep; write ``trials.csv``, ``trials.md`` and ``best.json`` into ``out``."""
    from ray import tune

    sweep.check()
    s = sweep.settings
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if s.search == "grid":
        space = {"lora_r": tune.grid_search(s.lora_r), "lr": tune.grid_search(s.lr)}
        samples = 1
    else:
        space = {"lora_r": tune.choice(s.lora_r), "lr": tune.choice(s.lr)}
        samples = s.num_samples
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )
    # The driver function itself only waits on its trainer, so it holds nothing: an empty head
    # bundle. Even 0.01 CPU would leave 0.99 of a CPU beside a whole-CPU task on a small box,
    # and the trial's 1-CPU training worker would wait for that task to end (the quickstart's
    # sweep sat 7 minutes behind its evaluations). Tune needs one non-empty bundle; a byte of
    # memory always fits.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=sweep, out=str(out), datasets=job_datasets(sweep.job)),
        tune.PlacementGroupFactory([{}, {"memory": 1}]),
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=scheduler,
            num_samples=samples,
            max_concurrent_trials=s.max_concurrent or job_capacity(sweep.job),
        ),
        run_config=tune.RunConfig(
            name=f"{sweep.job.name}-tune", storage_path=str(out / "tune"), verbose=0
        ),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        rows.append(
            {
                "lora_r": result.config["lora_r"],
                "lr": result.config["lr"],
                "val_loss": m.get("val_loss"),
                "val_accuracy": m.get("val_accuracy"),
                "steps": m.get("step"),
                "reports": m.get("training_iteration"),
                "stopped_early": not m.get("finished", 0),
                # The trial's own error, not Tune's wrapper ("ray::ImplicitFunc.train()").
                "error": None if result.error is None else failure_line(result.error),
            }
        )
    table = pd.DataFrame(rows).sort_values("val_loss", na_position="last", ignore_index=True)
    table.to_csv(out / "trials.csv", index=False)
    write_text(out / "trials.md", markdown_table(table))
    finished = table.dropna(subset=["val_loss"])
    if finished.empty:
        errors = table["error"].dropna()
        why = f"; first trial's error: {errors.iloc[0]}" if len(errors) else ""
        raise IntrospectError(f"sweep {sweep.job.name}: no trial reported a validation loss{why}")
    best = finished.iloc[0].to_dict()
    write_json(out / "best.json", best)
    return table
