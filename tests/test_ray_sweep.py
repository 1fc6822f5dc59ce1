"""A Tune sweep (LoRA rank × learning rate, ASHA) through the CLI on tiny-random."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from introspect.data import DataConfig, make_examples, split
from introspect.examples import write_examples
from introspect.vectors import VectorSet, random_vectors, save_vectors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


def write_data(tmp_path, n: int) -> None:
    """n tiny-random examples (train.parquet, val.parquet) and their vectors into tmp_path."""
    config = DataConfig(n=n, seed=0, magnitudes=[8.0], magnitude_mode="absolute")
    tr, va = split(make_examples(config, 4, VS), 0.2, 0)
    write_examples(tr, tmp_path / "train.parquet")
    write_examples(va, tmp_path / "val.parquet")
    save_vectors(tmp_path / "random.safetensors", VS)


def sweep(tmp_path, n: int, *args: str) -> subprocess.CompletedProcess:
    """`introspect sweep` on n tiny-random examples written into tmp_path."""
    write_data(tmp_path, n)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "sweep", "--model", "tiny-random",
         "--data", str(tmp_path), "--vectors", str(tmp_path / "random.safetensors"),
         "--out", str(tmp_path / "sweep"), *args],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip


def test_sweep_writes_its_table_and_best_config(tmp_path):
    sets = ("--set", "batch_size=4", "--set", "eval_every=2", "--set", "warmup_steps=1")
    r = sweep(tmp_path, 60, "--ranks", "1,2,4", "--lrs", "1e-3", "--steps", "4", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    # Every trial of the 3 x 1 grid ran and reported, two at a time on 2 CPUs (ASHA may stop
    # some early: a trial it stopped must release its workers, or the third would wait forever).
    trials = sorted(zip(table["lora_r"], table["lr"], strict=True))
    assert trials == [(1, 1e-3), (2, 1e-3), (4, 1e-3)]
    assert table["val_loss"].notna().all() and table["error"].isna().all()
    assert (tmp_path / "sweep" / "best.json").exists()
    assert (tmp_path / "sweep" / "trials.md").read_text().startswith("| lora_r |")


def test_a_failed_sweep_names_its_trials_error(tmp_path):
    """Every trial fails the same way: the stage's line and the table hold the real error, not
    Tune's wrapper ("ray::ImplicitFunc.train()") with colour codes."""
    r = sweep(tmp_path, 30, "--ranks", "2", "--lrs", "1e-3", "--steps", "2",
              "--set", "batch_size=400")  # fmt: skip
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "no trial reported a validation loss" in last and "larger than the 24" in last, last
    table = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    assert "larger than the 24" in table["error"].iloc[0] and "\x1b[" not in table["error"].iloc[0]


def test_a_trial_trains_beside_a_task_holding_a_whole_cpu(tmp_path):
    """On 2 CPUs with one held by another task (an evaluation, in a plan), a trial's 1-CPU
    worker still starts: the trial's own driver must hold no CPU at all, not even a fraction."""
    import threading

    import ray

    from introspect.train import preset
    from pipelines.sweep import Sweep, SweepSettings, run_sweep
    from pipelines.train_job import TrainJob

    write_data(tmp_path, 40)
    job = TrainJob(
        name="beside", model="tiny-random", train_data=str(tmp_path / "train.parquet"),
        val_data=str(tmp_path / "val.parquet"), vectors=[str(tmp_path / "random.safetensors")],
        config=preset("original", max_steps=2, batch_size=4, eval_every=1, warmup_steps=1),
        storage_path=str(tmp_path / "ray"),
    )  # fmt: skip

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        holder = Holder.remote()
        ray.get(holder.ready.remote())
        done: list = []
        settings = SweepSettings(lora_r=[2], lr=[1e-3])
        worker = threading.Thread(
            target=lambda: done.append(run_sweep(Sweep(job, settings), tmp_path / "sweep")),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=300)  # before the fix it waited for the holder forever
        assert done, "the trial's worker never started beside the 1-CPU holder"
        assert done[0]["val_loss"].notna().all()
    finally:
        ray.shutdown()
