"""Running a plan's stage: the recipe :func:`pipelines.plan.stage_configs` built for it, with
its output path and its context (a Ray Train engine for trainings, a host pool for evals)."""

from __future__ import annotations

import shutil
from pathlib import Path

from introspect.errors import IntrospectError
from pipelines.plan import Plan, eval_dtype, stage_configs
from pipelines.recipes import Context, TrainEngine, run_recipe


def run_stage(
    plan: Plan,
    name: str,
    part: str | None,
    out: Path,
    inputs: dict[str, Path],
    storage: str,
    pool=None,
    shards: Path | None = None,
    fan_outs: list[dict] | None = None,
) -> dict:
    """Run one unit of a stage into ``out`` (a fresh directory); returns its metrics.

    ``pool``: the eval stage's model hosts, when its models share one (``hosts: N``).
    ``shards``: where a pooled evaluation keeps its finished shards across retries.
    ``fan_outs``: where its fan-outs' counts go (shards retried, hosts revived)."""
    stage = plan.stages[name]
    [(_, kind, config)] = stage_configs(plan, name, inputs, part)
    context = Context(name=name, device="cuda" if plan.resources.use_gpu else None)
    target = out
    if kind == "vectors":
        target = out / f"{name}.safetensors"
    elif kind in ("train", "sweep"):
        context.train = TrainEngine(
            name=f"{plan.name}-{name}",
            storage_path=storage,
            num_workers=stage.num_workers,
            use_gpu=plan.resources.use_gpu,
            cpus_per_worker=plan.resources.cpus_per_worker,
            max_failures=plan.resources.max_failures,
        )
        if kind == "train":
            target = out / "run"
    elif pool is not None:
        from pipelines.fanout import pool_adapter, pool_mapper

        context.mapper = pool_mapper(
            pool, pool_adapter(config.model, config.adapter), progress=False, cache=shards,
            stats=fan_outs,
        )
    try:
        metrics = run_recipe(kind, config, target, context)
    except IntrospectError as e:
        who = f" ({part})" if part else ""
        raise IntrospectError(f"stages.{name}{who}: {e}") from None
    if kind == "train":  # the stage's summary and plot sit beside its run directory
        for f in ("summary.md", "curves.png"):
            shutil.move(str(target / f), str(out / f))
    if plan.tracking is not None:
        from pipelines.tracking import track_unit

        track_unit(plan.tracking, plan.name, name, part, kind, config, target, metrics)
    if kind == "vectors":
        (out / "summary.md").write_text(
            f"### Vectors `{name}`\n\n{metrics['n']} {metrics['kind']} vectors, d_model "
            f"{metrics['d_model']} for {config.model}.\n"
        )
    return metrics


# How long an eval stage's pool waits for a lost node to come back before it starts on the
# hosts that are free: an autoscaler restarts a node in a minute or two when it does at all.
POOL_WAIT_S = 120.0


def stage_pool(plan: Plan, name: str):
    """The host pool of an eval stage with ``hosts: N``: N hosts of the stage's base model, one
    GPU each on a GPU cluster (else ``cpus_per_worker`` CPUs each); close it when done."""
    from pipelines.fanout import eval_pool

    stage = plan.stages[name]
    try:
        return eval_pool(
            plan.stage_model(name),
            stage.hosts,
            num_cpus=plan.resources.cpus_per_worker,
            dtype=eval_dtype(plan, name),  # what each model's own load would use
            # The plan was checked against the whole cluster; one that is short of a node now
            # is short of a lost one the autoscaler is restarting. If it stays lost the stage
            # runs on fewer hosts: the fan-out's rows are the same for any number of them.
            wait_for_cluster_s=POOL_WAIT_S,
            fewer_ok=True,
        )
    except IntrospectError as e:
        raise IntrospectError(f"stages.{name}.{e}") from None
