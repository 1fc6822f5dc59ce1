"""Four training jobs at once on a fake-GPU cluster (two nodes × two GPUs), one GPU each."""

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from introspect.data import DataConfig, make_examples, split
from introspect.examples import write_examples
from introspect.train import preset
from introspect.vectors import VectorSet, random_vectors, save_vectors
from pipelines.concurrent import job_capacity, run_concurrently
from pipelines.train_job import TrainJob

pytestmark = pytest.mark.ray

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


def _min_free_gpus(stop: threading.Event, seen: list) -> None:
    """Sample the cluster's free GPUs until stopped (the least seen shows the overlap)."""
    while not stop.is_set():
        seen.append(ray.available_resources().get("GPU", 0.0))
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_four_jobs_run_concurrently_one_gpu_each(cluster, tmp_path):
    data = DataConfig(n=60, seed=0, magnitudes=[8.0], magnitude_mode="absolute")
    tr, va = split(make_examples(data, 4, VS), 0.2, 0)
    write_examples(tr, tmp_path / "train.parquet")
    write_examples(va, tmp_path / "val.parquet")
    save_vectors(tmp_path / "random.safetensors", VS)
    config = preset("original", batch_size=4, max_steps=12, eval_every=6, save_every=6)
    jobs = [
        TrainJob(
            name=f"run{i}",
            model="tiny-random",
            train_data=str(tmp_path / "train.parquet"),
            val_data=str(tmp_path / "val.parquet"),
            vectors=[str(tmp_path / "random.safetensors")],
            config=config,
            storage_path=str(tmp_path / "storage"),
            use_gpu=True,
            cpus_per_worker=0.5,
        )
        for i in range(4)
    ]
    assert job_capacity(jobs[0]) == 4
    stop, free = threading.Event(), []
    sampler = threading.Thread(target=_min_free_gpus, args=(stop, free))
    sampler.start()
    try:
        results = run_concurrently([(j, tmp_path / j.name) for j in jobs])
    finally:
        stop.set()
        sampler.join()
    errors = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    assert not errors, errors
    placed = [json.loads((tmp_path / j.name / "worker.json").read_text()) for j in jobs]
    # Each job held its own GPU: four distinct (node, GPU) pairs over the two GPU nodes.
    slots = {(p["node_id"], tuple(p["gpu_ids"])) for p in placed}
    assert len(slots) == 4 and all(len(p["gpu_ids"]) == 1 for p in placed)
    assert len({p["node_id"] for p in placed}) == 2
    # They ran at the same time: at some moment all four GPUs were held by the four jobs.
    assert min(free) == 0.0, f"never all four GPUs in use at once (least free: {min(free)})"
    for j in jobs:
        assert (tmp_path / j.name / "final" / "adapter_model.safetensors").exists()
