"""Experiment tracking: a plan's units logged to a local MLflow file store through Ray's
MLflowLoggerCallback, and the values read back equal the run's own files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.ray
@pytest.mark.slow
def test_a_plan_logs_its_training_and_eval(tmp_path):
    """Vectors, data, one training and B1 on tiny-random, with tracking on, run by the CLI.
    The finished training is exported too: the card of a real plan stage (test_export.py
    builds its plan layouts by hand)."""
    tracking = store(tmp_path)
    plan = {
        "name": "tracked",
        "model": "tiny-random",
        "resources": {"cpus_per_worker": 1},
        "tracking": tracking.model_dump(),
        "stages": {
            "random": {"kind": "vectors", "type": "random", "n": 20, "n_train": 10},
            "data": {"kind": "data", "vectors": "random", "n": 32, "magnitudes": [8.0],
                     "magnitude_mode": "absolute"},
            "orig": {"kind": "train", "preset": "original", "data": "data",
                     "overrides": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1,
                                   "eval_every": 2, "save_every": 2}},
            "b1": {"kind": "eval", "suite": "detection", "models": ["orig"], "vectors": ["random"],
                   "options": {"n_per_tier": 4, "magnitudes": [8.0], "magnitude_mode": "absolute"}},
        },
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cluster.cli", "run", str(path), "--runs-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "tracked"
    hashes = json.loads((root / "stages.json").read_text())
    log = [json.loads(x) for x in (root / "orig" / hashes["orig"] / "run" / "log.jsonl").open()]
    b1 = json.loads((root / "b1" / hashes["b1"] / "orig" / "metrics.json").read_text())
    found, client = runs(tracking)
    assert set(found) == {"tracked/orig", "tracked/b1/orig"}
    train = found["tracked/orig"]
    assert history(client, train, "loss") == [(x["step"], x["loss"]) for x in log]
    assert history(client, train, "val_accuracy") == [
        (x["step"], x["val_accuracy"]) for x in log if "val_accuracy" in x
    ]
    held = b1["tiers"]["held_out"]
    assert found["tracked/b1/orig"].data.metrics["tiers/held_out/accuracy"] == held["accuracy"]
    assert found["tracked/b1/orig"].data.metrics["tiers/held_out/auroc"] == held["auroc"]

    # The same training, exported: B1 found by itself, and a plan that rebuilds the same hashes.
    from huggingface_hub import ModelCard

    from introspect.export import export_run
    from introspect.io import load_yaml
    from pipelines.plan import stage_hashes

    export_run(root / "orig" / hashes["orig"], tmp_path / "hub")
    text = ModelCard.load(tmp_path / "hub" / "README.md").text
    lo, hi = held["ci"]["accuracy"]
    assert f"| orig | held_out | {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    again = parse_plan(load_yaml(tmp_path / "hub" / "reproduce" / "plan.yaml"))
    assert stage_hashes(again) == hashes
