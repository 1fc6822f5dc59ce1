"""Ray Data → Ray Train detection training on a 2-CPU local Ray (tiny-random, fp32)."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from introspect import models
from introspect.data import DataConfig, make_examples, split
from introspect.examples import write_examples
from introspect.train import preset, train
from introspect.vectors import VectorSet, random_vectors, save_vectors
from pipelines.train_job import TrainJob, run_train_job

pytestmark = pytest.mark.ray

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The dashboard serves the state API the kill test uses to find the training worker.
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data = DataConfig(n=60, seed=0, magnitudes=[8.0, 16.0], magnitude_mode="absolute")
    tr, va = split(make_examples(data, 4, VS), 0.2, 0)
    write_examples(tr, d / "train.parquet")
    write_examples(va, d / "val.parquet")
    save_vectors(d / "random.safetensors", VS)
    return d, tr, va


def quick(**kw):
    base = dict(lr=1e-3, warmup_steps=2, batch_size=4, eval_every=3, save_every=3, max_steps=6)
    return preset("original", **{**base, **kw})


def job(d, tmp_path, **kw):
    return TrainJob(
        name=kw.pop("name", "t"),
        model="tiny-random",
        train_data=str(d / "train.parquet"),
        val_data=str(d / "val.parquet"),
        vectors=[str(d / "random.safetensors")],
        config=kw.pop("config", quick()),
        storage_path=str(tmp_path / "storage"),
        **kw,
    )


def log(run_dir):
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_workers_train_with_ddp_and_checkpoint(tmp_path, files):
    d, tr, va = files
    # No LoRA dropout: two workers draw dropout masks for half-batches from their own RNG, so
    # with dropout on the runs differ by construction.
    config = quick(lora_dropout=0.0)
    train(models.load("tiny-random"), tr, va, {"random": VS}, config, tmp_path / "local")
    two = job(d, tmp_path, num_workers=2, cpus_per_worker=0.5, config=config)
    run_train_job(two, tmp_path / "ray2")
    local, remote = log(tmp_path / "local"), log(tmp_path / "ray2")
    # The same global batches, split across two workers and gradients averaged: the run
    # follows the single-process one (float sums in a different order: not bit-exact).
    for a, b in zip(local, remote, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
    ckpts = list((tmp_path / "storage" / "t").glob("checkpoint_*"))
    assert ckpts, "no checkpoint reached storage_path"
    assert (tmp_path / "ray2" / "checkpoints").is_dir()


def _registered(storage) -> bool:
    """Whether Ray Train has registered a checkpoint (its files can land before it does)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("checkpoint_results"))


def _kill_worker_after_first_checkpoint(storage, stop):
    """Wait for a registered checkpoint, then SIGKILL a training worker's process."""
    from ray.util.state import list_actors

    while not stop.is_set():
        if _registered(storage):
            here = ray.get_runtime_context().gcs_address
            for a in list_actors(here, filters=[("class_name", "=", "RayTrainWorker")]):
                if a.state == "ALIVE" and a.pid:
                    os.kill(a.pid, signal.SIGKILL)
                    return a.pid
        time.sleep(0.1)
    return None


def test_one_worker_killed_resumes_and_follows_the_single_process_loop(tmp_path, files):
    """One Ray Train worker, SIGKILLed after its first checkpoint, restarts from it and follows
    the uninterrupted single-process loop at 1e-5. The Ray job checkpoints its layers (v2's
    setting), the local loop does not: so the Ray path, a restart and gradient checkpointing
    all leave training as it is."""
    d, tr, va = files
    steps = dict(max_steps=30, save_every=5, eval_every=5)
    train(models.load("tiny-random"), tr, va, {"random": VS}, quick(**steps), tmp_path / "local")
    remote_config = quick(**steps, gradient_checkpointing=True)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(_kill_worker_after_first_checkpoint, tmp_path / "storage" / "k", stop)
        run_train_job(job(d, tmp_path, name="k", config=remote_config), tmp_path / "ray")
        stop.set()
        assert killed.result() is not None, "the run ended before a worker could be killed"
    # Every step logged once, and the resumed run follows the uninterrupted one.
    assert json.loads((tmp_path / "ray" / "worker.json").read_text())["resumed_from"]
    local, remote = log(tmp_path / "local"), log(tmp_path / "ray")
    assert [r["step"] for r in remote] == list(range(1, 31))
    for a, b in zip(local, remote, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["accuracy"] == b["accuracy"]
    assert (tmp_path / "ray" / "final" / "adapter_model.safetensors").exists()
    metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["wall_s"] > 0 and metrics["restarts"] == 1


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_zero3_killed_worker_resumes_from_its_shard_and_follows_one_process(tmp_path, files):
    """Two workers, full fine-tuning under DeepSpeed ZeRO-3 (CPU accelerator, gloo), one of
    them SIGKILLed after the first checkpoint: the single-process loop is the reference."""
    pytest.importorskip("deepspeed")
    d, tr, va = files
    config = quick(method="full", max_steps=20, save_every=4, eval_every=4)
    train(models.load("tiny-random"), tr, va, {"random": VS}, config, tmp_path / "local")
    zero = job(d, tmp_path, name="z", num_workers=2, cpus_per_worker=0.5, config=config)
    zero.deepspeed = True
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(_kill_worker_after_first_checkpoint, tmp_path / "storage" / "z", stop)
        run_train_job(zero, tmp_path / "ray")
        stop.set()
        assert killed.result() is not None, "the run ended before a worker could be killed"
    # The restarted workers started from a checkpoint, each back on its own shard, logged every
    # step once and followed the uninterrupted single-process run.
    worker = json.loads((tmp_path / "ray" / "worker.json").read_text())
    assert worker["resumed_from"] in {f"step-{s:06d}" for s in (4, 8, 12, 16)}, worker
    local, remote = log(tmp_path / "local"), log(tmp_path / "ray")
    assert [r["step"] for r in remote] == list(range(1, 21))
    # The same global batches; the sums run in another order (reduce-scatter vs one process).
    for a, b in zip(local, remote, strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss", "val_accuracy"):
            assert abs(a.get(key, 0) - b.get(key, 0)) <= 1e-4, (key, a, b)
    # final/ holds the whole model, gathered from the shards onto rank 0.
    a, b = _weights(tmp_path / "local"), _weights(tmp_path / "ray")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    plan = json.loads((tmp_path / "ray" / "deepspeed.json").read_text())
    assert plan["config"]["zero_optimization"]["stage"] == 3 and plan["plan"] is None  # CPU
    # Each worker's shard reached the last checkpoint in storage; out keeps no shards.
    last = max(p for p in (tmp_path / "storage" / "z").glob("checkpoint_*") if p.is_dir())
    shards = {p.name for p in last.glob("checkpoints/step-*/zero/*_optim_states.pt")}
    assert shards == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert (next(last.glob("checkpoints/step-*")) / "COMPLETE").read_text() == "20"
    assert not (tmp_path / "ray" / "checkpoints").exists()


def test_an_error_of_ours_is_not_retried(tmp_path, files):
    """Ray Train retries every error max_failures times; a config error would fail every time,
    so it stops at once: the training worker starts once, not 1 + max_failures times."""
    d, _, _ = files
    loads = tmp_path / "loads.jsonl"  # each worker start loads the model once
    config = quick(batch_size=400)  # more than the 48 training rows: refused in the worker
    bad = job(d, tmp_path, name="bad", config=config, max_failures=3,
              worker_env={"env_vars": {"INTROSPECT_LOAD_LOG": str(loads)}})  # fmt: skip
    with pytest.raises(Exception, match="larger than the 48 training examples"):
        run_train_job(bad, tmp_path / "out")
    assert len(loads.read_text().splitlines()) == 1


def test_only_a_lost_worker_is_retried(monkeypatch):
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipelines import train_job

    monkeypatch.setattr(train_job.time, "sleep", lambda s: None)
    died = WorkerGroupError("rank 0 died", {0: ray.exceptions.ActorDiedError()})
    ours = WorkerGroupError("rank 0", {0: UserExceptionWithTraceback(ValueError("bad"), "tb")})

    class Trainer:
        def __init__(self, errors):
            self.errors, self.fits = list(errors), 0

        def __call__(self):
            return self

        def fit(self):
            self.fits += 1
            if self.errors:
                raise self.errors.pop(0)
            return type("Result", (), {"error": None})()

    j = TrainJob("j", "tiny-random", "a", "b", [], max_failures=2)
    t = Trainer([died, died])
    assert train_job._fit(t, j)[1] == 2 and t.fits == 3
    t = Trainer([died, died, died])
    with pytest.raises(WorkerGroupError):
        train_job._fit(t, j)
    assert t.fits == 3
    t = Trainer([died, ours])
    with pytest.raises(WorkerGroupError, match="rank 0"):
        train_job._fit(t, j)
    assert t.fits == 2
