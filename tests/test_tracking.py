"""Experiment tracking: a plan's units logged to a local MLflow file store through Ray's
MLflowLoggerCallback, and the values read back equal the run's own files."""

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")  # the `tracking` extra (mlflow-skinny)

from introspect.config import Config  # noqa: E402
from introspect.errors import IntrospectError  # noqa: E402
from pipelines.plan import parse_plan  # noqa: E402
from pipelines.tracking import Tracking, track_unit  # noqa: E402
from pipelines.tracking import client as tracking_client  # noqa: E402


def store(tmp_path) -> Tracking:
    return Tracking(mlflow={"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "t"})


def runs(tracking: Tracking) -> dict:
    """Every run of the experiment by name: (run, its client)."""
    client = tracking_client(tracking)
    exp = client.get_experiment_by_name(tracking.mlflow.experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}, client


def history(client, run, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def fake_run(d, steps=5):
    d.mkdir(parents=True)
    log = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * s} for s in range(1, steps + 1)]
    log[-1] |= {"val_accuracy": 0.75, "val_loss": 0.5}
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (d / "metrics.json").write_text(json.dumps({"steps": steps, "best_val_accuracy": 0.75}))
    (d / "config.json").write_text(json.dumps({"lora_r": 4, "lr": 1e-3}))
    return log


class Params(Config):
    lora_r: int = 4
    model: str = "tiny-random"


def test_a_training_is_one_run_with_every_log_record_at_its_step(tmp_path):
    tracking = store(tmp_path)
    log = fake_run(tmp_path / "run")
    track_unit(tracking, "p", "orig", None, "train", Params(), tmp_path / "run", {})
    found, client = runs(tracking)
    run = found["p/orig"]
    assert history(client, run, "loss") == [(r["step"], r["loss"]) for r in log]
    assert history(client, run, "val_accuracy") == [(5, 0.75)]
    assert run.data.metrics["best_val_accuracy"] == 0.75  # metrics.json at the last step
    assert run.data.params["lora_r"] == "4" and run.data.params["model"] == "tiny-random"
    assert run.data.tags["plan"] == "p" and run.data.tags["kind"] == "train"
    assert run.info.status == "FINISHED"


def test_sweep_trials_and_eval_units_are_runs_too(tmp_path):
    tracking = store(tmp_path)
    logs = {n: fake_run(tmp_path / "sweep" / "trials" / n, k) for n, k in (("a", 3), ("b", 2))}
    track_unit(tracking, "p", "sw", None, "sweep", Params(), tmp_path / "sweep", {})
    metrics = {"tiers": {"held_out": {"accuracy": 0.625, "ci": {"accuracy": [0.4, 0.8]}}}}
    track_unit(tracking, "p", "b1", "orig", "eval.detection", Params(), tmp_path, metrics)
    found, client = runs(tracking)
    for n, log in logs.items():
        assert history(client, found[f"p/sw/{n}"], "loss") == [(r["step"], r["loss"]) for r in log]
        assert found[f"p/sw/{n}"].data.tags["sweep"] == "sw"
    b1 = found["p/b1/orig"]
    assert b1.data.metrics["tiers/held_out/accuracy"] == 0.625
    assert b1.data.tags["model"] == "orig"


def test_a_store_that_fails_costs_the_run_not_the_unit(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    broken = Tracking(mlflow={"tracking_uri": (tmp_path / "file").as_uri(), "experiment": "t"})
    fake_run(tmp_path / "run")
    track_unit(broken, "p", "orig", None, "train", Params(), tmp_path / "run", {})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: stages.orig: not logged to MLflow: ")


def test_no_tracking_block_logs_nothing(tmp_path):
    track_unit(None, "p", "orig", None, "train", Params(), tmp_path, {})
    assert not (tmp_path / "mlruns").exists()


def test_the_plan_block_is_checked_like_the_rest(tmp_path):
    plan = {"name": "x", "model": "tiny-random", "stages": {"v": {"kind": "vectors"}}}
    ok = parse_plan(
        {**plan, "tracking": {"mlflow": {"tracking_uri": "file:///m", "experiment": "e"}}}
    )
    assert ok.tracking.mlflow.experiment == "e" and parse_plan(plan).tracking is None
    local = parse_plan({**plan, "tracking": {"mlflow": {"tracking_uri": "ml", "experiment": "e"}}})
    assert local.tracking.mlflow.tracking_uri == (Path.cwd() / "ml").as_uri()  # absolute
    with pytest.raises(IntrospectError, match=r"^plan: tracking\.mlflow\.tracking_uri: .*absolute"):
        parse_plan({**plan, "tracking": {"mlflow": {"tracking_uri": "file:ml", "experiment": "e"}}})
    mlflow_block = {"tracking_uri": "file:///m", "experiment": "e", "experimnt": "f"}
    with pytest.raises(IntrospectError, match=r"^plan: tracking\.mlflow\.experimnt: unknown key"):
        parse_plan({**plan, "tracking": {"mlflow": mlflow_block}})


def test_two_units_creating_the_experiment_at_once_both_log(tmp_path, monkeypatch, capsys):
    """Two units that finish together both find no experiment and both create it; the one
    whose create comes second must still log its run (it lost the race, not its results)."""
    tracking = store(tmp_path)
    fake_run(tmp_path / "run")
    track_unit(tracking, "p", "first", None, "train", Params(), tmp_path / "run", {})
    looked = mlflow.MlflowClient.get_experiment_by_name
    calls = []

    def stale_once(self, name):  # the other unit created it just after this one looked
        calls.append(name)
        return None if len(calls) == 1 else looked(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", stale_once)
    track_unit(tracking, "p", "second", None, "train", Params(), tmp_path / "run", {})
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    assert set(runs(tracking)[0]) == {"p/first", "p/second"}
