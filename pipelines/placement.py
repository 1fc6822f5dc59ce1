"""What each unit of a plan holds while it runs, and whether the cluster can ever hold it.

Every unit that loads a model reserves the device it loads onto: one GPU on a GPU plan (a
training worker, a model host, an evaluation, a norms or concept-vector stage), else
``cpus_per_worker`` CPUs. The runner starts a unit only when what it holds fits beside what the
running units hold, so a host pool never waits behind a training for its GPUs; and a unit that
could not fit even on an idle cluster is refused before anything starts, in one line naming the
stage and the resource, instead of being queued by Ray forever.
"""

from __future__ import annotations

import math

from introspect.errors import IntrospectError
from pipelines.plan import Plan

Need = dict[str, float]  # {"CPU": n, "GPU": n}


def loads_model(stage) -> bool:
    """Whether the stage's own task loads the model (a training's workers are counted apart)."""
    if stage.kind == "vectors":
        return stage.type != "random"
    if stage.kind == "data":
        return stage.magnitude_mode == "relative" and not stage.norms
    return stage.kind in ("norms", "eval", "stance", "localize")


def _trials(stage) -> int:
    """How many sweep trials can run at once: the search's size, capped by max_concurrent."""
    n = len(stage.lora_r) * len(stage.lr) if stage.search == "grid" else stage.num_samples
    return min(n, stage.max_concurrent or n)


def unit_need(plan: Plan, name: str, total: Need | None = None) -> Need:
    """What one unit of stage ``name`` holds while it runs (the cluster's ``total`` caps a
    sweep's concurrent trials, as Tune does)."""
    stage, res = plan.stages[name], plan.resources
    gpu, cpus = res.use_gpu, res.cpus_per_worker
    if stage.kind in ("train", "sweep"):
        worker = {"CPU": cpus, "GPU": 1.0 if gpu else 0.0}
        n = stage.num_workers
        if stage.kind == "sweep":
            fits = _fits_times(scale(worker, n), total) if total else _trials(stage)
            n *= max(1, min(_trials(stage), fits))
        return scale(worker, n)
    if stage.kind == "eval" and stage.hosts:
        return {"CPU": stage.hosts * cpus, "GPU": float(stage.hosts) if gpu else 0.0}
    loads = loads_model(stage)
    return {"CPU": cpus, "GPU": 1.0 if gpu and loads else 0.0}


def scale(need: Need, n: float) -> Need:
    return {k: v * n for k, v in need.items()}


def _fits_times(need: Need, total: Need) -> int:
    return min(
        (math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0),
        default=1,
    )


def fits(need: Need, used: Need, total: Need) -> bool:
    """Whether ``need`` fits beside ``used`` on a cluster of ``total``."""
    return all(used.get(k, 0.0) + v <= total.get(k, 0.0) + 1e-9 for k, v in need.items() if v)


def add(a: Need, b: Need, sign: float = 1.0) -> Need:
    return {k: a.get(k, 0.0) + sign * b.get(k, 0.0) for k in {*a, *b}}


def check_feasible(
    plan: Plan, names: list[str], total: Need, nodes: list[Need] | None = None
) -> None:
    """Refuse, in one line, a stage the cluster could never hold (Ray would queue it silently):
    more than the cluster has in all, or a worker / host / task larger than any one node."""
    res = plan.resources
    for name in names:
        stage = plan.stages[name]
        per_worker = {"CPU": res.cpus_per_worker, "GPU": 1.0 if res.use_gpu else 0.0}
        one = (
            per_worker
            if stage.kind in ("train", "sweep") or getattr(stage, "hosts", 0)
            else (unit_need(plan, name))
        )
        if nodes and not any(fits(one, {}, node) for node in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
            shown = ", ".join(f"{v:g} {k}" for k, v in one.items() if v)
            has = ", ".join(f"{biggest.get(k, 0.0):g} {k}" for k in one)
            raise IntrospectError(
                f"stages.{name}: each worker needs {shown}, no node has that (the largest has "
                f"{has}); lower resources.cpus_per_worker"
            )
        need = unit_need(plan, name, total)
        if stage.kind == "sweep":
            need = scale(per_worker, stage.num_workers)  # one trial at a time is enough
        for key, fix in (("CPU", "lower resources.cpus_per_worker"), ("GPU", "")):
            have = total.get(key, 0.0)
            if need.get(key, 0.0) <= have + 1e-9:
                continue
            what = f"{need[key]:g} {key}" + ("s" if need[key] != 1 else "")
            if stage.kind in ("train", "sweep") and stage.num_workers > 1:
                what += f" ({stage.num_workers} workers)"
                fix = fix or f"lower stages.{name}.num_workers"
            if stage.kind == "eval" and stage.hosts:
                what += f" ({stage.hosts} hosts)"
                fix = f"lower stages.{name}.hosts" + (f" or {fix}" if key == "CPU" else "")
            fix = fix or "set resources.use_gpu: false, or add GPUs"
            raise IntrospectError(f"stages.{name}: needs {what}, the cluster has {have:g}; {fix}")
