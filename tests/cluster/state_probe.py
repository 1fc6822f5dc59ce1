"""What of a plan job runs where: Ray's state API, asked from the laptop through the tunnel.

The cluster harness runs this on the laptop with RAY_AUTH_MODE=token (the API wants the token).
The plan runner names each stage's Ray task `stage:<unit>` (e.g. `stage:b1-b[base]`).

    state_probe.py watch ADDRESS SUBMISSION_ID NODE_IP TIMEOUT [PREFER_TRAIN_S]
        Wait until a stage of the job runs on the node at NODE_IP: a `stage:` task running
        there, or a Ray Train worker alive there. With PREFER_TRAIN_S, for that many seconds
        only a Ray Train worker there counts (a training lasts long enough for a kill to land
        mid-run; a data stage is over in a second). Print one JSON line (those stages, and every
        actor alive there) and exit 0; exit 1 after TIMEOUT seconds.
    state_probe.py record ADDRESS SUBMISSION_ID
        Print one JSON line: every attempt of every `stage:` task of the job and every Ray Train
        worker it started, each with its state and its node's IP.
"""

import json
import sys
import time

from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes, list_tasks

TRAIN_WORKER = "RayTrainWorker"  # Ray Train V2's worker actor class


def ray_job_id(address: str, submission_id: str, timeout: float = 120) -> str:
    """The Ray job id (hex) of a submission, once its driver has started."""
    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        job_id = client.get_job_info(submission_id).job_id
        if job_id:
            return job_id
        time.sleep(1)
    raise SystemExit(f"job {submission_id} started no driver in {timeout:.0f} s")


def watch(address: str, submission_id: str, node_ip: str, timeout: float,
          prefer_train_s: float = 0.0) -> None:
    t0 = time.time()
    job = ray_job_id(address, submission_id)
    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")])
    node = next(n.node_id for n in nodes if n.node_ip == node_ip)
    client = JobSubmissionClient(address)
    while time.time() - t0 < timeout:
        if client.get_job_status(submission_id).is_terminal():
            raise SystemExit(f"job {submission_id} ended before a stage ran on {node_ip}")
        on_node = [("job_id", "=", job), ("node_id", "=", node)]
        tasks = list_tasks(address=address, filters=[*on_node, ("state", "=", "RUNNING")],
                           raise_on_missing_output=False)
        stages = sorted(t.name.removeprefix("stage:") for t in tasks
                        if t.name.startswith("stage:"))
        workers = list_actors(address=address, filters=[*on_node, ("state", "=", "ALIVE"),
                                                        ("class_name", "=", TRAIN_WORKER)],
                              raise_on_missing_output=False)
        if workers or (stages and time.time() - t0 >= prefer_train_s):
            # Every actor living there, of any job: Ray Data's cluster-wide helpers (detached,
            # pinned to the node of the first Ray Data user) may be among them.
            actors = list_actors(address=address, filters=[("node_id", "=", node),
                                                           ("state", "=", "ALIVE")],
                                 raise_on_missing_output=False)
            print(json.dumps({"stages": stages, "train_workers": len(workers),
                              "actors": sorted(a.class_name for a in actors),
                              "seen_after_s": round(time.time() - t0, 1)}))
            return
        time.sleep(1)
    print(f"no stage of {submission_id} ran on {node_ip} in {timeout:.0f} s", file=sys.stderr)
    raise SystemExit(1)


def record(address: str, submission_id: str) -> None:
    job = ray_job_id(address, submission_id)
    ips = {n.node_id: n.node_ip for n in list_nodes(address=address, limit=10_000)}
    time.sleep(3)  # task events reach the GCS in batches
    tasks = list_tasks(address=address, filters=[("job_id", "=", job)], limit=10_000,
                       raise_on_missing_output=False)
    stages = sorted(
        ({"unit": t.name.removeprefix("stage:"), "attempt": t.attempt_number, "state": t.state,
          "ip": ips.get(t.node_id), "error_type": t.error_type}
         for t in tasks if t.name.startswith("stage:")),
        key=lambda x: (x["unit"], x["attempt"]),
    )
    actors = list_actors(address=address, filters=[("job_id", "=", job),
                                                   ("class_name", "=", TRAIN_WORKER)],
                         limit=10_000, raise_on_missing_output=False)
    workers = [{"state": a.state, "ip": ips.get(a.node_id)} for a in actors]
    print(json.dumps({"stages": stages, "train_workers": workers}))


if __name__ == "__main__":
    action, address, submission = sys.argv[1:4]
    if action == "watch":
        prefer_train_s = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
        watch(address, submission, sys.argv[4], float(sys.argv[5]), prefer_train_s)
    else:
        record(address, submission)
