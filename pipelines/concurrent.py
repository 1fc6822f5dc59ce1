"""Several training jobs at once (the seed's five runs), each holding its own resources.

Each job is driven by a light Ray task (it only waits on its ``TorchTrainer``), so the trainers
run side by side; the workers of each job request their own CPUs or GPUs, which is what keeps
two jobs off one GPU. At most as many jobs are started as the cluster can hold at once, the
rest start as earlier ones finish, and one failed job does not stop the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from pipelines.train_job import TrainJob, run_train_job


def capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many training jobs of this shape the connected cluster holds at once."""
    total = ray.cluster_resources()
    if use_gpu:
        return max(1, int(total.get("GPU", 0) // num_workers))
    return max(1, int(total.get("CPU", 1) // (num_workers * cpus_per_worker)))


def job_capacity(job: TrainJob) -> int:
    return capacity(job.num_workers, job.cpus_per_worker, job.use_gpu)


@ray.remote(num_cpus=0)
def _drive(job: TrainJob, out: str) -> dict:
    return run_train_job(job, out)


def run_concurrently(
    jobs: list[tuple[TrainJob, str | os.PathLike]],
    max_concurrent: int | None = None,
    on_done=None,
) -> dict[str, dict | BaseException]:
    """Run every ``(job, out)``; return each job's metrics, or its exception, by job name.

    ``on_done(name, result)`` is called as each job ends (progress for the CLI and plans).
    """
    names = [j.name for j, _ in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique: {names}")
    limit = max_concurrent or (min(job_capacity(j) for j, _ in jobs) if jobs else 1)
    pending = list(jobs)
    running: dict[ray.ObjectRef, str] = {}
    results: dict[str, dict | BaseException] = {}
    while pending or running:
        while pending and len(running) < limit:
            job, out = pending.pop(0)
            running[_drive.remote(job, str(Path(out).resolve()))] = job.name
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            name = running.pop(ref)
            try:
                results[name] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a failed job is reported, the rest go on
                results[name] = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            if on_done is not None:
                on_done(name, results[name])
    return results
