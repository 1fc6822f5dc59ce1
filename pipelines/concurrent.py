"""How many training jobs of one shape the cluster holds at once (a sweep's concurrent trials).

A plan's runner schedules its trainings itself, by the devices each unit holds
(:mod:`pipelines.placement`): the seed's five runs go four at a time on four GPUs.
"""

from __future__ import annotations

import ray

from pipelines.train_job import TrainJob


def capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many training jobs of this shape the connected cluster holds at once."""
    total = ray.cluster_resources()
    if use_gpu:
        return max(1, int(total.get("GPU", 0) // num_workers))
    return max(1, int(total.get("CPU", 1) // (num_workers * cpus_per_worker)))


def job_capacity(job: TrainJob) -> int:
    return capacity(job.num_workers, job.cpus_per_worker, job.use_gpu)
