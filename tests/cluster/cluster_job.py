"""The job the cluster harness submits: proves every node runs the project, and reports back.

One task pinned to each alive node runs `introspect vectors random` on that node and returns
the file's SHA-256 (same seed, so every node must produce the same bytes). The last line is
`CLUSTER_JOB_REPORT {json}`, which the harness parses. (The worker-loss test submits a plan
instead: tests/cluster/harness.py, `plan_worker_loss`.)
"""

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


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


def main() -> None:
    ray.init()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(f"alive nodes: {[n['NodeManagerAddress'] for n in nodes]}", flush=True)
    t = time.time()
    refs = [vectors_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes]
    report = {"nodes": ray.get(refs)}
    report["alive_at_start"] = sorted(n["NodeManagerAddress"] for n in nodes)
    report["seconds"] = round(time.time() - t, 1)
    print("CLUSTER_JOB_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
