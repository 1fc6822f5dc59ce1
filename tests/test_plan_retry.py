"""A unit that loses its Ray worker is run again by the runner, and ends as a clean run would;
any other failure, or damage to a finished stage, is one line and is not retried."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray

from introspect.checkpoints import clear_stale
from introspect.report import build_report
from pipelines.plan import parse_plan
from pipelines.runner import State, retry_delay, run_plan

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def plan(runs, **retry):
    return parse_plan({
        "name": "r", "model": "tiny-random", "runs_dir": str(runs),
        "retry": {"backoff_s": 0.5, **retry},
        "stages": {
            "random": {"kind": "vectors", "type": "random", "n": 12, "n_train": 6, "seed": 0},
            "b1": {"kind": "eval", "suite": "detection", "models": ["base"], "vectors": ["random"],
                   "options": {"n_per_tier": 8, "magnitudes": [8.0], "magnitude_mode": "absolute",
                               "batch_size": 8, "min_mass": 0.0}},
        },
    })  # fmt: skip


def test_a_retry_clears_only_its_own_units_half_written_tries(tmp_path):
    # A try killed mid-write (SIGKILL: no cleanup ran) leaves .tmp-<unit>-<8 hex>; a unit whose
    # name starts the same (food vs food-control) and finished outputs are someone else's.
    names = [".tmp-food-0123abcd", ".tmp-food-0123abcd-old", ".tmp-food-control-0123abcd",
             ".tmp-food-x", "food-control", ".shards-food"]
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_text("x")
    removed = clear_stale(tmp_path / "food")
    assert sorted(p.name for p in removed) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_only_a_lost_worker_is_retried_with_a_doubling_wait():
    p = plan("runs", lost=2, backoff_s=3)
    assert [retry_delay(p, True, n) for n in range(3)] == [3, 6, None]
    assert retry_delay(p, False, 0) is None  # an error of ours fails the same way again
    assert retry_delay(plan("runs", lost=0), True, 0) is None


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def kill_task(name: str, stop: threading.Event) -> list[int]:
    """SIGKILL the first process of this test's Ray titled ``ray::<title>`` (the task's
    worker), once; Ray's processes descend from this one, other tests' do not."""
    killed: list[int] = []

    def watch():
        while not stop.is_set() and not killed:
            for proc in psutil.Process().children(recursive=True):
                try:
                    title = (proc.cmdline() or [""])[0]
                except psutil.Error:
                    continue
                if title.startswith(f"ray::{name}"):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_killed_eval_worker_is_retried_and_ends_as_a_clean_run(local_ray, tmp_path, capsys):
    p = plan(tmp_path / "runs")
    stop = threading.Event()
    killed = kill_task("stage:b1[base]", stop)
    status = run_plan(p, progress=False)
    stop.set()
    assert killed, "the b1 task was never seen running"
    assert status["b1[base]"].state is State.DONE, status
    err = capsys.readouterr().err
    assert "stages.b1[base]: WorkerCrashedError" in err and "retry 1 of 2 in 0.5 s" in err
    unit = next((tmp_path / "runs" / "r" / "b1").glob("*")) / "base"
    assert json.loads((unit / "timing.json").read_text())["retries"] == 1
    report = build_report(tmp_path / "runs" / "r").read_text()
    header = next(x for x in report.splitlines() if x.startswith("| stage |"))
    row = next(x for x in report.splitlines() if x.startswith("| b1[base] |"))
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    assert cells[" retries "].strip() == "1"
    retried = json.loads((unit / "metrics.json").read_text())
    # The same unit again, undisturbed: the same numbers.
    shutil.rmtree(unit)
    status = run_plan(p, progress=False)
    assert status["random"].state is State.SKIPPED and status["b1[base]"].state is State.DONE
    assert json.loads((unit / "metrics.json").read_text()) == retried
    assert json.loads((unit / "timing.json").read_text())["retries"] == 0

    # A finished unit whose outputs changed is reported, not silently reused or overwritten.
    metrics = unit / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"accuracy"', '"accuracx"', 1))
    before = metrics.read_bytes()
    status = run_plan(p, progress=False)
    line = status["b1[base]"].line
    assert status["b1[base]"].state is State.FAILED
    assert line.startswith(f"{unit} is marked complete but metrics.json changed since it was")
    assert line.endswith("delete that directory to run the stage again (it is not overwritten)")
    assert metrics.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root mounts")
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_runs_dir_that_cannot_be_written_is_one_line_before_ray_starts(tmp_path, fault):
    """The CLI inside a private mount namespace, on a tmpfs made read-only or filled up."""
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(json.dumps(plan("unused").model_dump(mode="json")))
    runs = tmp_path / "runs"
    runs.mkdir()
    spoil = {
        "read-only": f"mount -o remount,ro {runs}",
        "full": f"dd if=/dev/zero of={runs}/fill bs=4k 2>/dev/null; true",
    }[fault]
    cli = f"{sys.executable} -m cluster.cli run {plan_file} --runs-dir {runs}"
    script = f"mount -t tmpfs -o size=256k tmpfs {runs} && {spoil} && {cli}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    if "mount:" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip("mounts are not allowed here")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    want = {"read-only": "Read-only file system", "full": "No space left on device"}[fault]
    assert r.returncode == 2 and errors == [f"error: runs_dir: cannot write {runs}/r: {want}"], (
        r.stderr[-2000:]
    )
    assert "plan r:" not in r.stderr  # refused before Ray was started
