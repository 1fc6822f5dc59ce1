"""LoRA rank × learning-rate sweeps with Ray Tune and ASHA on validation loss.

Train V2's pattern: a Tune trial is a small driver function that builds a ``TorchTrainer`` (here
through :func:`pipelines.train_job.run_train_job`) and forwards its reports to Tune with
``TuneReportCallback``; ASHA stops trials whose validation loss lags. Trials run concurrently up
to what the cluster holds (one trial's workers each need a GPU on a GPU cluster).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from ray import tune

from introspect.errors import IntrospectError
from introspect.tables import markdown_table
from pipelines.concurrent import job_capacity
from pipelines.train_job import TrainJob, job_datasets, run_train_job


@dataclass
class Sweep:
    """A search over LoRA rank and learning rate around a base job."""

    job: TrainJob
    lora_r: list[int] = field(default_factory=lambda: [4, 16])
    lr: list[float] = field(default_factory=lambda: [1e-4, 5e-4])
    search: str = "grid"  # "grid": every pair; "random": num_samples draws from the lists
    num_samples: int = 4
    grace_period: int = 1  # ASHA: reports before a trial can be stopped
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: what the cluster holds
    seed: int = 0

    def validate(self) -> None:
        if self.search not in ("grid", "random"):
            raise IntrospectError(f"search: {self.search!r} must be 'grid' or 'random'")
        if not self.lora_r or any(r < 1 for r in self.lora_r):
            raise IntrospectError(f"lora_r: {self.lora_r} must be a non-empty list of ranks >= 1")
        if not self.lr or any(x <= 0 for x in self.lr):
            raise IntrospectError(f"lr: {self.lr} must be a non-empty list of rates > 0")
        if self.job.config.method != "lora":
            raise IntrospectError("method: a rank sweep needs method 'lora'")
        # Checked here, once, rather than by every trial after its workers have started.
        for path in [self.job.train_data, self.job.val_data, *self.job.vectors]:
            if "://" not in path and not Path(path).exists():
                raise IntrospectError(f"data: {path} does not exist")


def _trial(params: dict, sweep: Sweep, out: str, datasets: dict) -> None:
    """One Tune trial: a whole training job with this trial's rank and learning rate."""
    from ray.tune.integration.ray_train import TuneReportCallback

    r, lr = int(params["lora_r"]), float(params["lr"])
    name = f"{sweep.job.name}-r{r}-lr{lr:g}"
    config = replace(sweep.job.config, lora_r=r, lora_alpha=2 * r, lr=lr)
    # Every report must carry the metric ASHA reads: evaluate at every checkpoint.
    config = replace(config, save_every=config.eval_every)
    job = replace(sweep.job, name=name, config=config)
    run_train_job(
        job, Path(out) / "trials" / name, callbacks=[TuneReportCallback()], datasets=datasets
    )


def run_sweep(sweep: Sweep, out: str | os.PathLike) -> pd.DataFrame:
    """Run the sweep; write ``trials.csv``, ``trials.md`` and ``best.json`` into ``out``."""
    sweep.validate()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if sweep.search == "grid":
        space = {"lora_r": tune.grid_search(sweep.lora_r), "lr": tune.grid_search(sweep.lr)}
        samples = 1
    else:
        space = {"lora_r": tune.choice(sweep.lora_r), "lr": tune.choice(sweep.lr)}
        samples = sweep.num_samples
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
    )
    # The driver function itself only waits on its trainer: it takes almost no CPU.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=sweep, out=str(out), datasets=job_datasets(sweep.job)),
        {"CPU": 0.01},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=scheduler,
            num_samples=samples,
            max_concurrent_trials=sweep.max_concurrent or job_capacity(sweep.job),
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
                "error": None if result.error is None else str(result.error).splitlines()[0],
            }
        )
    table = pd.DataFrame(rows).sort_values("val_loss", na_position="last", ignore_index=True)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(markdown_table(table))
    finished = table.dropna(subset=["val_loss"])
    if finished.empty:
        raise IntrospectError(f"sweep {sweep.job.name}: no trial reported a validation loss")
    best = finished.iloc[0].to_dict()
    (out / "best.json").write_text(json.dumps(best, indent=2, default=str))
    return table
