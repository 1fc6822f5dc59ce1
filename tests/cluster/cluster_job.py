"""The job the cluster harness submits: proves every node runs the project, and reports back.

Default: one task pinned to each alive node runs `introspect vectors random` on that node and
returns the file's SHA-256 (same seed, so every node must produce the same bytes).
`--loss N`: N slow tasks spread over the nodes, for the worker-loss experiment; each records
where it completed, and the report counts the tasks Ray had to retry.
The last line is `CLUSTER_JOB_REPORT {json}`, which the harness parses.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Every task's "RUNNING i" line in the job log, uncoloured: Ray's driver would fold lines that
# differ only in numbers ("[repeated 3x across cluster]") and wrap prefixes in colour codes.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_COLOR_PREFIX", "0")

import ray  # noqa: E402 - after the logging settings above
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402


@ray.remote(num_cpus=1)
def vectors_on_node() -> dict:
    """Run the project's CLI on this node; return where it ran and what it wrote."""
    out = Path(tempfile.mkdtemp()) / "random.safetensors"
    introspect = Path(sys.executable).parent / "introspect"
    cmd = [str(introspect), "vectors", "random", "--model", "tiny-random", "--n", "8",
           "--n-train", "4", "--seed", "7", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    return {"ip": ray.util.get_node_ip_address(), "sha256": sha}


@ray.remote(num_cpus=1, max_retries=3)
def step(i: int, seconds: float) -> dict:
    """A slow unit of work that records the node it finally completed on."""
    # Ray streams this line to the job's log as "(step pid=.., ip=..) RUNNING i": the harness
    # waits for one from the worker, so it kills the worker while a task is in flight.
    print(f"RUNNING {i}", flush=True)
    time.sleep(seconds)
    return {"i": i, "ip": ray.util.get_node_ip_address()}


def retried_tasks() -> int:
    """How many `step` tasks needed more than one attempt (Ray's state API)."""
    from ray.util.state import list_tasks

    time.sleep(3)  # task events reach the GCS in batches
    attempts = list_tasks(
        filters=[("name", "=", "step")], limit=10_000, raise_on_missing_output=False
    )
    return len({t.task_id for t in attempts if t.attempt_number > 0})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss", type=int, default=0, help="run N spread tasks instead")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    ray.init()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(f"alive nodes: {[n['NodeManagerAddress'] for n in nodes]}", flush=True)
    t = time.time()
    if args.loss:
        refs = [step.options(scheduling_strategy="SPREAD").remote(i, args.seconds)
                for i in range(args.loss)]
        print("STARTED", flush=True)
        results = ray.get(refs)
        report = {"tasks": results, "n": args.loss, "retried": retried_tasks()}
    else:
        refs = [vectors_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote() for n in nodes]
        report = {"nodes": ray.get(refs)}
    report["alive_at_start"] = sorted(n["NodeManagerAddress"] for n in nodes)
    report["seconds"] = round(time.time() - t, 1)
    print("CLUSTER_JOB_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
