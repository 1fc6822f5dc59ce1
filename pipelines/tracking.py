"""Experiment tracking: a plan's trainings, sweep trials and evaluations logged to MLflow.

Turned on by the plan's ``tracking:`` block (``mlflow-skinny`` installed)::

    tracking: {mlflow: {tracking_uri: file:///abs/path/mlruns, experiment: quickstart}}

Logging goes through Ray's built-in :class:`ray.air.integrations.mlflow.MLflowLoggerCallback`.
That is a Ray Tune callback, and Ray Train V2's ``TorchTrainer`` takes only
``ray.train.UserCallback``s, so each finished unit's results are handed to it the way Tune
hands it a trial's: one MLflow run per training (its config as parameters, every
``log.jsonl`` record at its step), per sweep trial (the same, from the trial's run directory)
and per evaluated model (its numeric metrics, flattened: ``tiers/held_out/accuracy``).
Tracking is not part of a stage's hash: turning it on reruns nothing, and stages that finished
before are not logged again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from introspect.config import Config
from introspect.io import read_jsonl


class MLflowTracking(Config):
    tracking_uri: str = Field(
        description="MLflow tracking URI: a directory or file:///abs/dir (a local store), or a "
        "server's URL"
    )
    experiment: str = Field(min_length=1, description="MLflow experiment (created if missing)")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute(cls, uri: str) -> str:
        # Stages log from Ray workers, whose working directory is not the plan's.
        if "://" not in uri and not uri.startswith("file:"):
            return Path(uri).resolve().as_uri()
        if uri.startswith("file:") and not uri.startswith("file:///"):
            raise ValueError("a file: URI must be absolute (file:///dir), or give the directory")
        return uri

    @model_validator(mode="after")
    def _installed(self) -> MLflowTracking:
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed: pip install 'introspect[tracking]'")
        return self


class Tracking(Config):
    mlflow: MLflowTracking | None = Field(None, description="log to MLflow")


@dataclass(eq=False)  # hashed by identity, as Tune's trials are
class _Trial:
    """What MLflowLoggerCallback reads of a Tune trial: its name and its config."""

    name: str
    config: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def _allow_file_store(uri: str) -> None:
    """MLflow 3 refuses a ``file:`` store unless told it is wanted; a plan that names one
    wants it (no server to run, nothing but the directory)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def client(tracking: Tracking):
    """An ``mlflow.MlflowClient`` on the plan's store, to read what was logged."""
    import mlflow

    _allow_file_store(tracking.mlflow.tracking_uri)
    return mlflow.MlflowClient(tracking.mlflow.tracking_uri)


def _experiment(tracking: Tracking) -> None:
    """Create the plan's experiment unless it exists. Units that finish together may all find
    none and all create it: the callback's own look-then-create fails for all but one of them
    ("already exists"), which here means it is there to log to."""
    import mlflow

    store, name = client(tracking), tracking.mlflow.experiment
    if store.get_experiment_by_name(name) is not None:
        return
    try:
        store.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        if store.get_experiment_by_name(name) is None:
            raise


def log_run(tracking: Tracking, name: str, params: dict, records: list[dict], tags: dict) -> None:
    """One MLflow run: ``params``, then each record at its ``step`` (else 1, 2, ...)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    _allow_file_store(tracking.mlflow.tracking_uri)
    cb = MLflowLoggerCallback(
        tracking_uri=tracking.mlflow.tracking_uri,
        experiment_name=tracking.mlflow.experiment,
        tags=tags,
    )
    cb.setup()
    trial = _Trial(name, params)
    cb.log_trial_start(trial)
    for i, record in enumerate(records, 1):
        step = int(record.get("step", i))
        cb.log_trial_result(step, trial, {**record, "training_iteration": step})
    cb.log_trial_end(trial)


def _training_records(run_dir: Path) -> list[dict]:
    """log.jsonl, with the run's final metrics.json added at its last step."""
    records = read_jsonl(run_dir / "log.jsonl") if (run_dir / "log.jsonl").exists() else []
    if records and (run_dir / "metrics.json").exists():
        final = json.loads((run_dir / "metrics.json").read_text())
        records.append({**final, "step": records[-1]["step"]})
    return records


def track_unit(tracking: Tracking | None, plan: str, stage: str, part: str | None, kind: str,
               config: Config, out: Path, metrics: dict) -> None:  # fmt: skip
    """Log one finished plan unit (``out``: what its recipe wrote) when tracking is on.

    A store that cannot be reached costs the unit its MLflow run, not its results: one line on
    stderr, and the unit finishes."""
    if tracking is None or tracking.mlflow is None:
        return
    try:
        _track(tracking, plan, stage, part, kind, config, out, metrics)
    except Exception as e:  # any store error: the results are already written
        who = f" ({part})" if part else ""
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"warning: stages.{stage}{who}: not logged to MLflow: {line}", file=sys.stderr)


def _track(tracking, plan, stage, part, kind, config, out, metrics) -> None:
    _experiment(tracking)  # once per unit, not per run: a sweep logs a run for every trial
    tags = {"plan": plan, "stage": stage, "kind": kind}
    params = config.model_dump()
    if kind == "train":
        log_run(tracking, f"{plan}/{stage}", params, _training_records(out), tags)
    elif kind == "sweep":
        for trial in sorted((out / "trials").glob("*")):
            cfg = trial / "config.json"
            trial_params = json.loads(cfg.read_text()) if cfg.exists() else {}
            name = f"{plan}/{stage}/{trial.name}"
            log_run(tracking, name, trial_params, _training_records(trial), tags | {"sweep": stage})
    elif kind.startswith("eval."):
        who = part or "model"
        log_run(tracking, f"{plan}/{stage}/{who}", params, [metrics], tags | {"model": who})
