"""`ray up ray_cluster.yaml` for real: two hosts in network namespaces, real sshd, token auth.

One cluster for the module (tests/cluster/harness.py builds it; see its docstring for the
hosts). The tests run in file order, because each step needs the one before: the cluster
comes up, jobs run through the SSH tunnel with and without the token, the plan is submitted,
then the fault scenarios of faults.py (a plan run clean, then with the worker host killed
during a training and during an evaluation fan-out, one Ray Train worker killed, the driver
killed), then `ray down` and a check that nothing of ours is left.

The plan submitted is tests/plans/tiny.yaml, the reduced variant of plans/quickstart.yaml
(tiny-random, the same kinds of stage). The full quickstart takes ~15 minutes on 2 free
cores, over this test's time budget; INTROSPECT_CLUSTER_PLAN=plans/quickstart.yaml runs it.
"""

import json
import os
import time
from pathlib import Path

# tests/cluster has no __init__.py, so pytest puts it on sys.path: harness.py is a module.
import faults
import harness as ch
import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]

TIMINGS: dict[str, float] = {}
# Runs of each fault scenario: one keeps make test-cluster near 25 min (.ci/run's 60 min holds
# make test as well); docs/cluster.md gives the counts of the runs made for it.
FAULT_RUNS = int(os.environ.get("INTROSPECT_FAULT_RUNS", "1"))
RESULTS = REPO / "test-artifacts" / "cluster-faults.json"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the cluster test needs root (namespaces, sshd); run it as root")
    t0 = time.time()
    h = ch.Harness()
    try:
        h.start()
        TIMINGS["hosts_s"] = round(time.time() - t0, 1)
        h.make_token()
        h.ray_up()
        TIMINGS.update(h.timings)
        with h.tunnel():
            yield h
    finally:
        h.cleanup()
        TIMINGS["total_s"] = round(time.time() - t0, 1)
        print("\ncluster test timings:", json.dumps(TIMINGS))


def test_the_config_is_ray_cluster_yaml_with_only_ips_user_and_key_changed(cluster):
    # derive_config touching nothing else is checked in tests/test_ray_cluster_yaml.py.
    base = yaml.safe_load(ch.CONFIG.read_text())
    used = yaml.safe_load((cluster.work / "cluster.yaml").read_text())
    assert used == ch.derive_config(base, ch.HEAD_IP, [ch.WORKER_IP], "root", str(cluster.key))


def test_both_hosts_join_the_cluster(cluster):
    TIMINGS["both_nodes_s"] = cluster.wait_nodes(2, timeout=300)
    assert cluster.alive_nodes() == [ch.HEAD_IP, ch.WORKER_IP]


def test_dashboard_and_job_api_listen_on_loopback_only(cluster):
    on_8265 = [a for a in cluster.listening("head") if a.endswith(":8265")]
    assert on_8265 == ["127.0.0.1:8265"]
    probe = f"import socket; socket.create_connection(('{ch.HEAD_IP}', 8265), timeout=5)"
    r = cluster.on("laptop", ["python", "-c", probe], check=False)
    assert r.returncode != 0 and "Connection refused" in r.stderr


def test_the_gcs_port_is_open_but_refuses_a_client_without_the_token(cluster):
    address = f"{ch.HEAD_IP}:6379"
    refused = cluster.on("laptop", ["ray", "status", "--address", address], timeout=180,
                         check=False, RAY_AUTH_MODE="disabled")
    assert refused.returncode != 0
    assert "InvalidAuthToken" in refused.stdout + refused.stderr
    ok = cluster.on("laptop", ["ray", "status", "--address", address], timeout=180,
                    check=False, RAY_AUTH_MODE="token")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_job_with_the_token_runs_the_project_on_both_nodes(cluster):
    t = time.time()
    r = cluster.submit(ch.SMOKE_JOB)
    TIMINGS["smoke_job_s"] = round(time.time() - t, 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = ch.report(r.stdout)
    assert sorted(n["ip"] for n in report["nodes"]) == [ch.HEAD_IP, ch.WORKER_IP]
    # Same seed on both nodes: the project's CLI ran on each and wrote identical vectors.
    assert len({n["sha256"] for n in report["nodes"]}) == 1


def test_a_job_without_the_token_or_with_a_wrong_one_is_refused(cluster):
    listed = cluster.on("laptop", ["ray", "job", "list", "--address", ch.DASHBOARD],
                        check=False, RAY_AUTH_MODE="token")
    before = listed.stdout.count("submission_id=")
    r = cluster.submit(ch.SMOKE_JOB, token=False)
    assert r.returncode != 0
    assert "Unauthorized: Missing authentication token" in r.stdout + r.stderr
    wrong = cluster.on("laptop", ["ray", "job", "list", "--address", ch.DASHBOARD], check=False,
                       RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    assert wrong.returncode != 0
    assert "Forbidden: Invalid authentication token" in wrong.stdout + wrong.stderr
    # The server refuses it, not just our client: a bare HTTP POST without a token gets 401.
    post = ("import urllib.request as u, urllib.error as e\n"
            f"req = u.Request('{ch.DASHBOARD}/api/jobs/', data=b'{{\"entrypoint\": \"true\"}}')\n"
            "try:\n    print(u.urlopen(req).status)\n"
            "except e.HTTPError as x:\n    print(x.code)\n")
    assert cluster.on("laptop", ["python", "-c", post]).stdout.strip() == "401"
    after = cluster.on("laptop", ["ray", "job", "list", "--address", ch.DASHBOARD],
                       check=False, RAY_AUTH_MODE="token").stdout.count("submission_id=")
    assert after == before  # no job was created by any refused request


def test_the_plan_submitted_with_introspect_submit_succeeds_and_its_report_comes_back(cluster):
    t = time.time()
    r = cluster.submit_plan(ch.PLAN)
    TIMINGS["plan_job_s"] = round(time.time() - t, 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    name = yaml.safe_load((REPO / ch.PLAN).read_text())["name"]
    local = cluster.work / "report.md"
    cluster.rsync_down(f"~/introspect-runs/{name}/report.md", local)
    text = local.read_text()
    assert text.startswith(f"# {name}: report")
    assert "## B1 detection across models" in text


@pytest.fixture(scope="module")
def clean(cluster):
    """The fault plan run once with no fault: what every faulted run is compared with."""
    RESULTS.unlink(missing_ok=True)
    out = faults.clean_run(cluster)
    TIMINGS["faults_clean_s"] = out["s"]
    assert out["rc"] == 0, out
    return out


@pytest.mark.parametrize("scenario", faults.SCENARIOS)
def test_a_fault_needs_no_resubmission_and_changes_no_result(cluster, clean, scenario):
    """Each scenario of tests/cluster/faults.py, FAULT_RUNS times, each run on its own run
    directory: the plan completes with no resubmission (the driver scenario: one), every B1
    row exists exactly once with the clean run's p_yes, and the metrics and final weights equal
    the clean run's. Every run's record goes to test-artifacts/cluster-faults.json."""
    runs = []
    for i in range(FAULT_RUNS):
        out = faults.run(cluster, scenario, i)
        if "error" not in out["compare"]:
            out["worst"] = faults.worst(out["compare"])
        runs.append(out)
        _record(out)
        print(f"\n{scenario} run {i}:", json.dumps({k: v for k, v in out.items()
                                                    if k != "compare"}))
    for out in runs:
        if scenario == "driver":
            assert out["status"] == "FAILED", out  # the driver is gone: a user resubmits
            assert out["resubmit"]["rc"] == 0, out["resubmit"]
        else:
            assert out["status"] == "SUCCEEDED", out
        assert set(out["units"].values()) <= {"done", "skipped"}, out["units"]
        assert "error" not in out["compare"], out["compare"]
        w = out["worst"]
        assert w["missing_or_extra_rows"] == 0, out["compare"]
        assert w["max_p_yes_diff"] <= 1e-5, out["compare"]
        assert w["max_b1_metrics_diff"] <= 1e-5, out["compare"]
        assert w["max_train_diff"] <= 1e-5, out["compare"]
        assert out["leftovers"] == [], out["leftovers"]
        if scenario in ("host-train", "train-worker"):  # somebody ran the lost work again
            assert out["tries"] or out["train_decisions"], out
        if scenario == "host-fanout":
            # The lost host's work ran again: its shards on the surviving host (retried, or a
            # backup copy of one queued on the lost host), or, where Ray had placed the eval
            # units' own tasks on that node, the units by the runner's retry. Which one is
            # Ray's placement; the results are required equal either way.
            again = {"shard_retries", "shard_backups", "retries"}
            assert any(again & set(t) for t in out["tries"].values()), out
    # Both nodes again for what follows (the next run starts only on a whole cluster too).
    faults.whole_cluster(cluster)
    assert cluster.alive_nodes() == [ch.HEAD_IP, ch.WORKER_IP]


def _record(out: dict) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*done, out], indent=1))


def test_ray_down_stops_ray_and_cleanup_leaves_nothing_behind(cluster):
    r = cluster.ray_down()
    assert r.returncode == 0
    assert cluster.on("head", ["pgrep", "-f", "raylet"], check=False).stdout == ""
    # `ray down` on a local provider runs `ray stop` on the head only; the worker's raylet
    # exits by itself once the GCS is gone.
    t = time.time()
    while cluster.on("worker", ["pgrep", "-f", "raylet"], check=False).stdout:
        assert time.time() - t < 180, "worker raylet still running 3 min after ray down"
        time.sleep(5)
    TIMINGS["worker_ray_gone_after_down_s"] = round(time.time() - t, 1)
    cluster.cleanup()
    assert cluster.leftovers() == []
