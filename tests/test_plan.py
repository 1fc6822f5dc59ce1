"""Plans: validation errors name the field, a plan runs end to end, reruns skip, kills resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from introspect.errors import IntrospectError
from pipelines.plan import load_plan, parse_plan, stage_hashes

TINY = Path(__file__).parent / "plans" / "tiny.yaml"
CLI = [sys.executable, "-m", "cluster.cli"]
# Files a person should look at after a run (the report's screenshot); not committed.
ARTIFACTS = Path(
    os.environ.get("INTROSPECT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def cli(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_shipped_plans_are_valid():
    for path in sorted((Path(__file__).parent.parent / "plans").glob("*.yaml")):
        assert load_plan(path).stages, path


def test_a_malformed_plan_on_the_cli_exits_2_and_writes_nothing(tmp_path):
    plan = tiny()
    plan["stages"]["original"]["preset"] = "orignal"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan))
    r = cli("run", str(path), "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "stages.original.preset" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_stage_that_lost_its_ray_worker_or_node_says_so_and_what_to_do():
    import ray
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from pipelines.failures import failure_line as _failure

    lost = "(a Ray worker or node this stage used was lost; run the plan again"
    node = ray.exceptions.NodeDiedError("Task failed because the node it was running on is dead.")
    for e in (ray.exceptions.WorkerCrashedError(), node):
        assert _failure(e).startswith(f"{type(e).__name__}: ") and lost in _failure(e)
    # A training that lost a worker or its data: the error behind Ray Train's.
    for e in (WorkerGroupError("rank 0 died", {0: node}), ControllerError(node)):
        line = _failure(e)
        assert line.startswith("NodeDiedError: Task failed because the node") and lost in line
    user = WorkerGroupError("rank 0", {0: UserExceptionWithTraceback(ValueError("bad"), "tb")})
    assert _failure(user) == "ValueError: bad"
    # An error Ray could not unpickle: named from the traceback Ray kept.
    trace = "Traceback (most recent call last):\n  File x\nray.exceptions.ObjectLostError: gone.\n"
    unpickled = _failure(ray.exceptions.UnserializableException(trace))
    assert unpickled.startswith("ObjectLostError: gone. ") and lost in unpickled
    trace = "Traceback:\nray.exceptions.ActorDiedError: The actor died.\n"
    unpickled = _failure(ray.exceptions.UnserializableException(trace))
    assert unpickled.startswith("ActorDiedError: The actor died. ") and lost in unpickled
    assert _failure(ValueError("bad value")) == "ValueError: bad value"
    assert _failure(IntrospectError("stages.x: no")) == "stages.x: no"


def test_hashes_change_downstream_of_an_edit_only():
    before = stage_hashes(parse_plan(tiny()))
    plan = tiny()
    plan["stages"]["data-food"]["n"] = 50
    after = stage_hashes(parse_plan(plan))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"data-food", "food-control", "b1"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny plan run once to the end through the CLI (its own local Ray), logging to a
    local MLflow store (tracking is not part of any hash: the plan is the same plan)."""
    runs = tmp_path_factory.mktemp("runs")
    plan = tiny()
    plan["tracking"] = {"mlflow": {"tracking_uri": (runs / "mlruns").as_uri(), "experiment": "t"}}
    path = runs / "tiny.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))  # the report follows stage order
    r = cli("run", str(path), "--runs-dir", str(runs))
    assert r.returncode == 0, r.stderr[-3000:]
    return runs / "tiny"


@pytest.mark.ray
@pytest.mark.slow
def test_report_numbers_equal_the_metrics_files(finished):
    report = (finished / "report.md").read_text()
    assert (finished / "report.html").exists()
    hashes = json.loads((finished / "stages.json").read_text())
    for model in ("base", "original", "food-control"):
        m = json.loads((finished / "b1" / hashes["b1"] / model / "metrics.json").read_text())
        held = m["tiers"]["held_out"]
        lo, hi = held["ci"]["accuracy"]
        row = f"| {model} | held_out | {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |"
        assert row in report, row
    assert "**food-control** (food-control):" in report
    assert "## Time and cost per stage" in report and "| total |" in report
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (finished / img).exists(), img


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_skips_every_stage(finished):
    before = (finished / "report.md").read_text()
    r = cli("run", str(TINY), "--runs-dir", str(finished.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    status = json.loads((finished / "status.json").read_text())
    assert set(status.values()) == {"skipped"}
    assert (finished / "report.md").read_text() == before


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_run_loses_no_finished_stage_and_ends_the_same(finished, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*CLI, "run", str(TINY), "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    # Kill the whole run (driver, Ray and its workers) once the first training has finished.
    deadline = time.time() + 600
    while not list((runs / "tiny").glob("*/*/COMPLETE")) or not any(
        (runs / "tiny" / s).glob("*/COMPLETE") for s in ("original", "food-control")
    ):
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    marks = {p: p.stat().st_mtime for p in (runs / "tiny").glob("**/COMPLETE")}
    assert marks
    r = cli("run", str(TINY), "--runs-dir", str(runs))
    assert r.returncode == 0, r.stderr[-2000:]
    for p, t in marks.items():  # finished stages were skipped, not redone
        assert p.stat().st_mtime == t, p
    status = json.loads((runs / "tiny" / "status.json").read_text())
    assert "skipped" in status.values() and "done" in status.values()

    # The same report as the uninterrupted run, apart from wall times.
    def results(path):
        text = path.read_text().split("## Time and cost per stage")[0]
        return re.sub(r"wall \d+ s", "", text)

    assert results(runs / "tiny" / "report.md") == results(finished / "report.md")
    shutil.rmtree(runs, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(finished):
    """report.html in headless Chromium: every image loads at a non-zero size, every link
    and anchor leads somewhere; the screenshot is kept in test-artifacts/."""
    import browser

    binary = browser.chromium()
    if binary is None:
        pytest.skip("no chromium, and not root with apt-get to install it")
    page = finished / "report.html"
    seen = browser.probe(binary, page)
    markdown_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (finished / "report.md").read_text())
    assert [i["src"] for i in seen["images"]] == markdown_images and markdown_images
    for image in seen["images"]:
        assert image["complete"] and min(image["natural"]) > 0, image
        assert min(image["shown"]) > 0, image
    assert any(link["anchor"] for link in seen["links"])  # the contents list
    assert not [link for link in seen["links"] if link["broken"]]
    shot = browser.screenshot(binary, page, ARTIFACTS / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.ray
@pytest.mark.slow
def test_the_plan_was_tracked_in_mlflow_as_its_run_files_say(finished):
    from pipelines.tracking import Tracking
    from pipelines.tracking import client as tracking_client

    store = (finished.parent / "mlruns").as_uri()
    client = tracking_client(Tracking(mlflow={"tracking_uri": store, "experiment": "t"}))
    exp = client.get_experiment_by_name("t")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    trainings = ("original", "food-control")
    models = ("base", *trainings)
    assert set(found) == {f"tiny/{t}" for t in trainings} | {f"tiny/b1/{m}" for m in models}
    hashes = json.loads((finished / "stages.json").read_text())

    def history(run, key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    for name in trainings:
        log = [json.loads(x) for x in (finished / name / hashes[name] / "run" / "log.jsonl").open()]
        run = found[f"tiny/{name}"]
        assert history(run, "loss") == [(x["step"], x["loss"]) for x in log]
        assert history(run, "val_accuracy") == [
            (x["step"], x["val_accuracy"]) for x in log if "val_accuracy" in x
        ]
        assert run.data.params["max_steps"] == "6" and run.data.tags["kind"] == "train"
    for model in models:
        held = json.loads((finished / "b1" / hashes["b1"] / model / "metrics.json").read_text())
        held = held["tiers"]["held_out"]
        logged = found[f"tiny/b1/{model}"].data.metrics
        assert logged["tiers/held_out/accuracy"] == held["accuracy"]
        assert logged["tiers/held_out/auroc"] == held["auroc"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_plan_stage_exports_with_its_b1_table_and_a_plan_that_rebuilds_it(finished, tmp_path):
    """test_export.py builds its run layouts by hand; this is the card of a real plan stage."""
    from huggingface_hub import ModelCard

    from introspect.export import export_run
    from introspect.io import load_yaml

    hashes = json.loads((finished / "stages.json").read_text())
    export_run(finished / "original" / hashes["original"], tmp_path / "hub")
    text = ModelCard.load(tmp_path / "hub" / "README.md").text
    m = json.loads((finished / "b1" / hashes["b1"] / "original" / "metrics.json").read_text())
    held = m["tiers"]["held_out"]
    lo, hi = held["ci"]["accuracy"]
    assert f"| original | held_out | {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    again = parse_plan(load_yaml(tmp_path / "hub" / "reproduce" / "plan.yaml"))
    assert stage_hashes(again) == hashes
