"""Commands that drive Ray rather than a recipe: plans, job submission, cluster status, reports;
and the host pool behind ``--hosts`` on the evaluation commands."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from introspect.errors import IntrospectError

DASHBOARD = "http://127.0.0.1:8265"  # the job API, through the SSH tunnel docs/cluster.md shows
ADDRESS_HELP = "Ray to use: local (default: a private local Ray), auto, HOST:PORT, ray://HOST:PORT"


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.command("run")
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--runs-dir", type=click.Path(path_type=Path), help="default: the plan's runs_dir")
@click.option("--fail-fast/--no-fail-fast", default=False, help="stop at the first failed stage")
def run(plan: Path, address: str | None, runs_dir: Path | None, fail_fast: bool) -> None:
    """Carry out a plan: every unfinished stage, then the report."""
    from cluster.connect import connect
    from introspect.io import check_writable
    from introspect.report import build_report
    from pipelines.plan import load_plan
    from pipelines.runner import State, plan_root, run_plan

    p = load_plan(plan)  # every stage validated before Ray starts or anything is written
    if runs_dir is not None:
        p.runs_dir = str(runs_dir)
    check_writable(plan_root(p), "runs_dir")  # read-only or full: said before Ray starts
    _say(f"plan {p.name}: {len(p.stages)} stages on {connect(address)}")
    _check_on_cluster(p)  # what cannot fit or be scheduled is refused before anything runs
    status = run_plan(p, progress=True, fail_fast=fail_fast)
    report = build_report(plan_root(p))
    failed = {k: s for k, s in status.items() if not s.ok}
    done = sum(s.state is State.DONE for s in status.values())
    skipped = sum(s.state is State.SKIPPED for s in status.values())
    _say(f"{done} ran, {skipped} skipped, {len(failed)} failed → {report}")
    for key, s in failed.items():
        print(f"error: stages.{key}: {s.line or s}", file=sys.stderr)
    if failed:
        sys.exit(1)


@click.command("check")
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--gpus", type=click.IntRange(min=0), default=0, help="GPUs of the cluster")
@click.option("--gpu-memory", type=click.FloatRange(min=1), default=80.0, show_default=True,
              help="GiB of memory per GPU (an A100 80GB: 80)")  # fmt: skip
@click.option("--cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the cluster (default: this machine's, or 8 per GPU)")  # fmt: skip
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=0.35, show_default=True,
              help="model FLOPs utilisation assumed on the GPUs")  # fmt: skip
@click.option("--gpu-tflops", type=click.FloatRange(min=1), default=312.0, show_default=True,
              help="peak dense bf16 TFLOP/s of one GPU (A100: 312, H100 SXM: 989)")  # fmt: skip
def check(plan: Path, gpus: int, gpu_memory: float, cpus: int | None, mfu: float,
          gpu_tflops: float) -> None:  # fmt: skip
    """Will every stage fit, and how long and how much? Loads no weights."""
    import os

    from pipelines.check import Device, check_plan, format_estimate
    from pipelines.plan import load_plan

    p = load_plan(plan)
    cpus = cpus or (8 * gpus if gpus else os.cpu_count() or 1)
    dev = Device(gpus=gpus, gpu_memory_gb=gpu_memory, cpus=cpus, mfu=mfu, gpu_tflops=gpu_tflops)
    click.echo(format_estimate(check_plan(p, dev), p))


def _check_on_cluster(p) -> None:
    """``check`` with the connected cluster's resources, before anything runs; the GPUs'
    memory is known where the driver sees a GPU (else only counts are checked)."""
    import ray
    import torch

    from pipelines.check import Device, check_plan

    res = ray.cluster_resources()
    memory = float("inf")
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
    dev = Device(gpus=int(res.get("GPU", 0)), gpu_memory_gb=memory, cpus=int(res.get("CPU", 1)))
    try:
        estimate = check_plan(p, dev)
    except IntrospectError:
        raise  # cannot fit or be scheduled: refused before anything runs
    except Exception as e:  # noqa: BLE001 - an estimate that fails must not stop a run
        _say(f"check: no estimate ({type(e).__name__}: {e})")
        return
    _say(f"estimate: {estimate.wall_s / 60:.0f} min wall, {estimate.device_hours:.2f} "
         f"device-hours, ${estimate.usd:.2f} (introspect check for the table)")  # fmt: skip


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild report.md and report.html from the results on disk."""
    from introspect.report import build_report

    _say(f"wrote {build_report(run_dir)} and report.html")


@click.command("submit")
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--address", default=DASHBOARD, show_default=True, help="the Ray job API address")
@click.option("--runs-dir", default="~/introspect-runs", show_default=True,
              help="run directory on the cluster's head node")  # fmt: skip
@click.option("--wait/--no-wait", default=True, help="follow the job's logs until it ends")
def submit(plan: Path, address: str, runs_dir: str, wait: bool) -> None:
    """Submit a plan as a Ray job (working_dir = this repository) and follow it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipelines.plan import load_plan

    load_plan(plan)  # refuse a malformed plan here, not on the cluster
    repo = Path(__file__).resolve().parent.parent
    try:
        rel = plan.resolve().relative_to(repo)
    except ValueError:
        raise IntrospectError(f"plan: {plan} must be inside the repository {repo}") from None
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection and auth errors come in many types
        raise IntrospectError(f"address: cannot reach the Ray job API at {address} ({e})") from None
    job_id = client.submit_job(
        entrypoint=f"introspect run {rel} --address auto --runs-dir {runs_dir}",
        runtime_env={
            "working_dir": str(repo),
            "excludes": [".venv/", "runs/", ".git/", "*.safetensors", "__pycache__/"],
        },
    )
    _say(f"submitted {job_id} to {address}")
    print(job_id)
    if not wait:
        return
    for lines in _tail(client, job_id):
        sys.stderr.write(lines)
    state = client.get_job_status(job_id)
    _say(f"job {job_id}: {state}")
    if state != JobStatus.SUCCEEDED:
        sys.exit(1)


def _tail(client, job_id: str):
    import asyncio

    async def collect():
        async for lines in client.tail_job_logs(job_id):
            yield lines

    agen = collect()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


@click.command("status")
@click.option("--address", default="auto", show_default=True, help="Ray address (auto, HOST:PORT)")
@click.option("--jobs", default=None, help="job API address to list jobs")
def status(address: str, jobs: str | None) -> None:
    """Nodes, resources in use and (with --jobs) the cluster's jobs."""
    import ray

    from cluster.connect import connect

    _say(connect(address))
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"nodes": len(nodes), "total": total, "available": free}, indent=2))
    if jobs:
        from ray.job_submission import JobSubmissionClient

        for j in JobSubmissionClient(jobs).list_jobs():
            print(f"{j.submission_id}\t{j.status}\t{j.entrypoint}")


ADDRESS = click.Option(["--address"], default=None, help=ADDRESS_HELP)
HOSTS = click.Option(
    ["--hosts"],
    type=click.IntRange(min=1),
    default=None,
    help="run on a pool of N model hosts on Ray (default: in this process)",
)


@contextmanager
def hosts_mapper(engine: dict, config):
    """With ``--hosts N``: a mapper over N ModelHosts of the config's model (under its adapter)
    on the Ray at ``--address``; the pool is closed on exit. Without: no mapper."""
    if not engine.get("hosts"):
        yield None
        return
    from cluster.connect import connect
    from pipelines.fanout import eval_pool, pool_adapter, pool_mapper

    lora = pool_adapter(config.model, config.adapter)  # refuse a non-adapter before starting
    where = connect(engine.get("address"))
    _say(f"loading {config.model} on {engine['hosts']} hosts ({where})")
    pool = eval_pool(config.model, engine["hosts"], lora, dtype=config.dtype)
    with pool:
        yield pool_mapper(pool, lora)


@contextmanager
def connected(engine: dict, config):
    """Connect to the Ray at ``--address`` before a recipe that runs on Ray (a sweep)."""
    from cluster.connect import connect

    _say(f"on {connect(engine.get('address'))}")
    yield None
