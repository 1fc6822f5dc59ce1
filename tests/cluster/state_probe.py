"""What of a plan job lives where: Ray's state API, asked from the laptop through the tunnel.

The cluster harness runs this on the laptop with RAY_AUTH_MODE=token (the API wants the token).

    state_probe.py actors ADDRESS SUBMISSION_ID
        Print one JSON line: the job's alive Ray Train workers and model hosts, each with its
        node's IP and its process id there.
"""

import json
import sys
import time

from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes

# Ray Train V2's worker actor, and the evaluation pool's (actors/model_host.py), by class.
CLASSES = {"RayTrainWorker": "train_workers", "Host": "model_hosts"}  # ModelHost wraps Host


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


def actors(address: str, submission_id: str) -> None:
    job = ray_job_id(address, submission_id)
    ips = {n.node_id: n.node_ip for n in list_nodes(address=address, limit=10_000)}
    alive = list_actors(address=address, filters=[("job_id", "=", job), ("state", "=", "ALIVE")],
                        limit=10_000, raise_on_missing_output=False)
    out = {kind: [] for kind in CLASSES.values()}
    for a in alive:
        if a.class_name in CLASSES:
            out[CLASSES[a.class_name]].append({"ip": ips.get(a.node_id), "pid": a.pid})
    print(json.dumps(out))


if __name__ == "__main__":
    action, address, submission = sys.argv[1:4]
    if action != "actors":
        raise SystemExit(f"unknown action {action!r}")
    actors(address, submission)
