"""CLI commands that run on Ray: plans, sweeps, job submission, cluster status, reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from introspect.errors import IntrospectError

console = Console(stderr=True)

Address = Annotated[
    str | None,
    typer.Option(help="Ray to use: local (default: a private local Ray), auto, ray://HOST:PORT"),
]
DASHBOARD = "http://127.0.0.1:8265"  # the job API, through the SSH tunnel docs/cluster.md shows


def run(
    plan: Annotated[Path, typer.Argument(help="plan file (YAML)")],
    address: Address = None,
    runs_dir: Annotated[
        Path | None, typer.Option(help="where run directories go (default: the plan's runs_dir)")
    ] = None,
    fail_fast: Annotated[bool, typer.Option(help="stop at the first failed stage")] = False,
) -> None:
    """Carry out a plan: every unfinished stage, then the report."""
    from cluster.connect import connect
    from introspect.report import build_report
    from pipelines.plan import load_plan
    from pipelines.runner import plan_root, run_plan

    p = load_plan(plan)  # validated before anything starts or is written
    if runs_dir is not None:
        p.runs_dir = str(runs_dir)
    console.print(f"plan {p.name}: {len(p.stages)} stages on {connect(address)}")
    status = run_plan(p, progress=True, fail_fast=fail_fast)
    report = build_report(plan_root(p))
    failed = {k: v for k, v in status.items() if not v.startswith(("done", "skipped"))}
    done = sum(v == "done" for v in status.values())
    skipped = sum(v == "skipped" for v in status.values())
    console.print(f"{done} ran, {skipped} skipped, {len(failed)} failed → {report}")
    for key, line in failed.items():
        print(f"error: stages.{key}: {line}", file=sys.stderr)
    if failed:
        raise typer.Exit(1)


def report(run_dir: Annotated[Path, typer.Argument(help="a plan's run directory")]) -> None:
    """Rebuild report.md and report.html from the results on disk."""
    from introspect.report import build_report

    console.print(f"wrote {build_report(run_dir)} and report.html")


def sweep(
    model: Annotated[str, typer.Option("--model", help="Hugging Face id, local dir, or alias")],
    data: Annotated[Path, typer.Option(help="directory with train.parquet and val.parquet")],
    vectors: Annotated[list[Path], typer.Option(help="vector file(s) the examples refer to")],
    out: Annotated[Path, typer.Option(help="sweep directory (trials.csv, best.json)")],
    ranks: Annotated[str, typer.Option(help="comma-separated LoRA ranks")] = "4,16",
    lrs: Annotated[str, typer.Option(help="comma-separated learning rates")] = "1e-4,5e-4",
    preset: str = "original",
    steps: Annotated[int | None, typer.Option(help="optimizer steps per trial")] = None,
    search: Annotated[str, typer.Option(help="grid or random")] = "grid",
    num_samples: Annotated[int, typer.Option(help="trials for random search")] = 4,
    set_: Annotated[list[str] | None, typer.Option("--set", help="config key=value")] = None,
    address: Address = None,
    gpu: Annotated[bool, typer.Option(help="one GPU per training worker")] = False,
) -> None:
    """LoRA rank × learning rate with Ray Tune and ASHA on validation loss."""
    from cluster.cli import _floats, _parse_overrides
    from cluster.connect import connect
    from introspect.train import preset as make_preset
    from pipelines.sweep import Sweep, run_sweep
    from pipelines.train_job import TrainJob

    overrides = _parse_overrides(set_ or [])
    if steps is not None:
        overrides["max_steps"] = steps
    rank_list = [int(r) for r in _floats(ranks, "ranks")]
    job = TrainJob(
        name=out.resolve().name,
        model=model,
        train_data=str(data / "train.parquet"),
        val_data=str(data / "val.parquet"),
        # Absolute: a Tune trial runs in its own working directory.
        vectors=[str(v.resolve()) for v in vectors],
        config=make_preset(preset, **overrides),
        storage_path=str(out / "ray"),
        use_gpu=gpu,
    )
    s = Sweep(job, rank_list, _floats(lrs, "lrs"), search, num_samples)
    s.validate()
    console.print(f"sweep on {connect(address)}")
    table = run_sweep(s, out)
    console.print(table.to_string(index=False))
    console.print(f"wrote trials.csv, trials.md and best.json to {out}")


def submit(
    plan: Annotated[Path, typer.Argument(help="plan file inside this repository")],
    address: Annotated[str, typer.Option(help="the Ray job API (dashboard) address")] = DASHBOARD,
    runs_dir: Annotated[
        str, typer.Option(help="run directory on the cluster's head node")
    ] = "~/introspect-runs",
    wait: Annotated[bool, typer.Option(help="follow the job's logs until it ends")] = True,
) -> None:
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
    console.print(f"submitted {job_id} to {address}")
    print(job_id)
    if not wait:
        return
    for lines in _tail(client, job_id):
        sys.stderr.write(lines)
    status = client.get_job_status(job_id)
    console.print(f"job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


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


def status(
    address: Annotated[str, typer.Option(help="Ray address (auto, HOST:PORT)")] = "auto",
    jobs: Annotated[str | None, typer.Option(help="job API address to list jobs")] = None,
) -> None:
    """Nodes, resources in use and (with --jobs) the cluster's jobs."""
    import ray

    from cluster.connect import connect

    console.print(connect(address))
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"nodes": len(nodes), "total": total, "available": free}, indent=2))
    if jobs:
        from ray.job_submission import JobSubmissionClient

        for j in JobSubmissionClient(jobs).list_jobs():
            print(f"{j.submission_id}\t{j.status}\t{j.entrypoint}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("report")(report)
    app.command("sweep")(sweep)
    app.command("submit")(submit)
    app.command("status")(status)
