"""A fake 2-node × 2-GPU cluster: one ModelHost per GPU, and a fan-out that loses a node."""

import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.model_host import host_pool
from introspect.evals.detection import detection_trials
from introspect.examples import score_examples
from introspect.vectors import VectorSet, random_vectors
from pipelines.fanout import fan_out

pytestmark = pytest.mark.ray

RANDOM = VectorSet(random_vectors(64, 12, 0), "tiny-random", "random", 6, name="random")
SETS = {"random": RANDOM}

# The slow shard function below lives in this test module, which Ray workers cannot import:
# ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_score(lm, df, vector_sets, marker_dir, delay_s):
    """score_examples, after leaving a marker naming this node and sleeping ``delay_s``."""
    node = ray.get_runtime_context().get_node_id()
    Path(marker_dir, f"{node}.{uuid.uuid4().hex}").touch()
    time.sleep(delay_s)
    return score_examples(lm, df, vector_sets, batch_size=8)


@pytest.fixture(scope="module")
def cluster():
    # CPU is scarce here: one CPU per node, hosts take half a CPU each.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    with host_pool("tiny-random", num_cpus=0.5) as hosts:
        yield hosts


def test_one_host_per_gpu(cluster, pool):
    _, workers = cluster
    assert len(pool) == 4  # sized to the cluster's GPUs
    slots = {(i["node_id"], i["gpu_ids"][0]) for i in pool.infos}
    assert len(slots) == 4 and all(len(i["gpu_ids"]) == 1 for i in pool.infos)
    per_node = {w.node_id: sum(i["node_id"] == w.node_id for i in pool.infos) for w in workers}
    assert per_node == {w.node_id: 2 for w in workers}
    # Fake GPUs have no CUDA behind them: the hosts run on the CPU.
    assert {i["device"] for i in pool.infos} == {"cpu"}


def test_fan_out_survives_losing_a_node(cluster, pool, tiny, tmp_path):
    c, workers = cluster
    doomed = workers[1]
    trials = detection_trials(4, RANDOM, n_per_tier=12, magnitudes=[4.0, 16.0], seed=2)
    trials["trial"] = range(len(trials))
    with ThreadPoolExecutor(1) as ex:
        args = (slow_score, trials, "trial", 3, SETS, str(tmp_path), 0.5)
        run = ex.submit(fan_out, pool, *args, progress=False)
        # Remove the node only once one of its hosts is inside a shard.
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(doomed.node_id) for p in tmp_path.iterdir()):
            if run.done():
                run.result()  # raises what went wrong
            assert time.monotonic() < deadline and not run.done(), "no shard reached the node"
            time.sleep(0.05)
        started = len(list(tmp_path.iterdir()))
        c.remove_node(doomed)
        out = run.result(timeout=120)
    assert started < out.attrs["fan_out"]["shards"], "the node was removed mid-run"
    assert out.attrs["fan_out"]["retries"] >= 1
    assert list(out.trial) == list(trials.trial) and out.trial.is_unique
    assert list(out.index) == list(trials.index)
    expected = score_examples(tiny, trials, SETS, batch_size=8)
    assert (out.p_yes - expected.p_yes).abs().max() <= 1e-5
