"""Carry out a plan on the connected Ray cluster: every stage once, in dependency order.

A stage's directory is ``runs/<plan>/<stage>/<hash>``; it is written under a temporary name and
renamed when the stage succeeds, then marked ``COMPLETE``, so a rerun skips finished stages and
an interrupted one starts again from scratch (training resumes from its Ray Train checkpoints,
which live under the plan's storage and survive the interruption). Independent stages run side by
side: training drivers take no CPU themselves (their workers hold the CPUs or GPUs), at most as
many trainings as the cluster holds are started, and every other stage is a Ray task that asks
for one CPU (or one GPU on a GPU plan), so the cluster's size sets the concurrency.

A unit whose Ray worker or node was lost is run again, at most ``plan.retry.lost`` times after
a doubling wait: a training resumes from its last checkpoint in storage, a pooled evaluation
reads back the shards it had merged. Any other failure stops that unit at once, with its line.
A finished unit whose files no longer match its manifest is reported, never reused or rewritten.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import ray

from introspect.checkpoints import clear_stale, replace_dir
from introspect.errors import IntrospectError
from introspect.io import check_writable, write_json, write_text
from introspect.manifest import damage, write_manifest
from pipelines import stages as S
from pipelines.failures import failure_line, is_lost
from pipelines.placement import add, check_feasible, fits, unit_need
from pipelines.plan import Plan, eval_dtype, inputs, order, stage_hashes

COMPLETE = "COMPLETE"


class State(Enum):
    """Where a unit of a plan stands."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"  # finished by an earlier run
    FAILED = "failed"
    BLOCKED = "blocked"  # an input failed


@dataclass(frozen=True)
class UnitStatus:
    state: State
    line: str = ""  # a failed unit's one-line error

    @property
    def ok(self) -> bool:
        return self.state in (State.DONE, State.SKIPPED)

    def __str__(self) -> str:
        if self.state is State.FAILED:
            return f"failed: {self.line}"
        if self.state is State.BLOCKED:
            return "blocked (an input failed)"
        return self.state.value


@dataclass
class StageRun:
    """A unit the runner schedules: a whole stage, or one model of an eval stage."""

    stage: str
    part: str | None  # the model of an eval stage
    out: Path
    needs: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.stage if self.part is None else f"{self.stage}[{self.part}]"


def plan_root(plan: Plan) -> Path:
    return Path(plan.runs_dir) / plan.name


def stage_dirs(plan: Plan) -> dict[str, Path]:
    hashes = stage_hashes(plan)
    return {name: plan_root(plan) / name / hashes[name] for name in plan.stages}


def units(plan: Plan) -> list[StageRun]:
    """Every schedulable unit, in an order where each follows what it needs.

    An eval stage's model unit needs only its own model's training (and the stage's vectors),
    so one failed training blocks only the evaluations of that model."""
    dirs = stage_dirs(plan)
    out = []
    for name in order(plan):
        stage = plan.stages[name]
        needs = inputs(stage)
        if stage.kind == "eval":
            for m in stage.models:
                own = [n for n in needs if n not in stage.models or n == m]
                out.append(StageRun(name, m, dirs[name] / m, own))
        else:
            out.append(StageRun(name, None, dirs[name], needs))
    return out


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).exists()


def _execute(
    plan: Plan,
    unit: StageRun,
    input_dirs: dict[str, Path],
    storage: str,
    pool=None,
    retries: int = 0,
) -> dict:
    """Run one unit into a temporary directory, then move it into place and mark it done.

    ``pool``: the eval stage's host pool, when its models share one (``hosts: N``).
    ``retries``: how many earlier tries of this unit lost their worker (kept in timing.json).
    The manifest, written last, lets a rerun tell damaged outputs from finished ones."""
    kind = plan.stages[unit.stage].kind
    timing: dict = {}
    # Outside the temporary directory, which a failed try discards: kept until the unit is done.
    shards = unit.out.with_name(f".shards-{unit.out.name}") if pool is not None else None

    fan_outs: list[dict] = []

    def fill(tmp: Path) -> None:
        started = time.time()
        metrics = S.run_stage(
            plan, unit.stage, unit.part, tmp, input_dirs, storage, pool, shards, fan_outs
        )
        ended = time.time()
        timing.update(_cost(plan, kind, metrics, started, ended, len(pool) if pool else 1))
        if pool is not None:  # a pool started only when its devices were free waits ~0 s
            timing["pool_wait_s"] = pool.wait_s
            if pool.asked:  # started on fewer hosts than asked: a node stayed lost
                timing["pool_hosts_asked"] = pool.asked
            # Shards whose host was lost and ran again elsewhere; hosts Ray restarted; backup
            # copies of straggling shards; shards a retry of the unit read back from an earlier try.
            counts = {"retries": "shard_retries", "revived": "hosts_revived",
                      "backups": "shard_backups", "cached": "shards_cached"}  # fmt: skip
            for k, name in counts.items():
                timing[name] = sum(f[k] for f in fan_outs)
        timing["retries"] = retries
        if isinstance(metrics, dict) and metrics.get("restarts"):  # Ray Train's own restarts
            timing["restarts"] = metrics["restarts"]
        write_json(tmp / "timing.json", timing)
        if not (tmp / "metrics.json").exists():
            write_json(tmp / "metrics.json", metrics)
        write_manifest(tmp)
        (tmp / COMPLETE).write_text(str(ended))

    clear_stale(unit.out)
    replace_dir(unit.out, fill)
    if shards is not None:
        shutil.rmtree(shards, ignore_errors=True)
    return timing


def _cost(
    plan: Plan, kind: str, metrics: dict, started: float, ended: float, devices: int = 1
) -> dict:
    """Wall time, device-hours and dollars at the plan's rates (``devices``: held meanwhile)."""
    wall = ended - started
    gpu = plan.resources.use_gpu
    if kind in ("train",) and isinstance(metrics, dict) and "worker_hours" in metrics:
        hours = metrics["worker_hours"]
    else:
        hours = devices * wall / 3600  # a pooled eval holds every host's device
    rate = plan.cost.usd_per_gpu_hour if gpu else plan.cost.usd_per_cpu_hour
    return {
        "started": started,
        "ended": ended,
        "wall_s": wall,
        "device": "gpu" if gpu else "cpu",
        "device_hours": hours,
        "usd": hours * rate,
    }


def _remote_options(plan: Plan, unit: StageRun) -> dict:
    """The Ray task's resources: what the unit holds, except for drivers whose Ray Train
    workers or model hosts hold them. ``num_cpus`` is also torch's thread count there."""
    kind = plan.stages[unit.stage].kind
    if kind in ("train", "sweep"):
        return {"num_cpus": 0}
    need = unit_need(plan, unit.stage)
    return {"num_cpus": need["CPU"], "num_gpus": need["GPU"]}


# Both remote functions return the failed units by key ({} when all went well): the one-line
# error and whether a worker or node was lost (worth a retry). Both are made where the error
# happened: some errors (a failed Ray Train run's) cannot be unpickled elsewhere, and would
# arrive as "Failed to deserialize exception". The runner retries, not Ray (max_retries=0):
# it knows which failures a retry can mend, and it counts them.
@ray.remote(max_retries=0)
def _execute_remote(
    plan_json: str, unit: StageRun, input_dirs: dict, storage: str, retries: int
) -> dict:
    plan = Plan.model_validate_json(plan_json)
    try:
        _execute(plan, unit, {k: Path(v) for k, v in input_dirs.items()}, storage, None, retries)
    except Exception as e:  # noqa: BLE001 - reported as the unit's line
        return {unit.key: (failure_line(e), is_lost(e))}
    return {}


@ray.remote(max_retries=0, num_cpus=0)  # a driver: the pool's hosts hold the resources
def _execute_pooled(
    plan_json: str, units: list[StageRun], input_dirs: dict, storage: str, pool, retries: dict
):
    """The models of one eval stage in turn on the plan's host pool for its model; one failed
    model stops no other."""
    plan = Plan.model_validate_json(plan_json)
    dirs = {k: Path(v) for k, v in input_dirs.items()}
    failed = {}
    for u in units:
        try:
            _execute(plan, u, dirs, storage, pool, retries.get(u.key, 0))
        except Exception as e:  # noqa: BLE001 - reported per model, the rest go on
            failed[u.key] = (failure_line(e), is_lost(e))
    return failed


def retry_delay(plan: Plan, lost: bool, retries: int) -> float | None:
    """Seconds to wait before running a failed unit again, or None to let it fail: only a
    lost worker or node is retried, at most ``retry.lost`` times, each wait twice the last."""
    if not lost or retries >= plan.retry.lost:
        return None
    return plan.retry.backoff_s * 2**retries


def pool_key(plan: Plan, name: str) -> tuple:
    """Eval stages with the same key share one host pool for the whole plan: the model loads
    once per GPU, not once per stage (at 32B, a minute and 65 GB per host each time)."""
    stage = plan.stages[name]
    return (plan.stage_model(name), eval_dtype(plan, name), stage.hosts)


def run_plan(plan: Plan, progress: bool = True, fail_fast: bool = False) -> dict[str, UnitStatus]:
    """Run every unfinished stage; return each unit's :class:`UnitStatus` by key."""
    root = check_writable(plan_root(plan).resolve(), "runs_dir")
    try:
        write_text(root / "plan.json", plan.model_dump_json(indent=2))
        # Which hash of each stage this version of the plan uses (the report reads it).
        write_json(root / "stages.json", stage_hashes(plan))
    except OSError as e:  # read-only, full, or not ours: before any stage starts
        raise IntrospectError(f"runs_dir: cannot write {root}: {e.strerror or e}") from None
    storage = plan.storage or str(root / "ray")
    dirs = {k: v.resolve() for k, v in stage_dirs(plan).items()}
    todo = units(plan)
    for u in todo:
        u.out = u.out.resolve()
    status: dict[str, UnitStatus] = {}
    for u in todo:
        if is_complete(u.out):
            problem = damage(u.out)
            status[u.key] = (
                UnitStatus(State.SKIPPED)
                if problem is None
                else UnitStatus(
                    State.FAILED,
                    f"{u.out} is marked complete but {problem}: delete that directory to run "
                    "the stage again (it is not overwritten)",
                )
            )
    stage_keys: dict[str, list[str]] = {}
    for u in todo:
        stage_keys.setdefault(u.stage, []).append(u.key)

    def stage_done(name: str) -> bool:
        return all(k in status and status[k].ok for k in stage_keys[name])

    def stage_failed(name: str) -> bool:
        return any(k in status and not status[k].ok for k in stage_keys[name])

    def unsettled(u: StageRun) -> bool:
        """Not finished, and its inputs neither all done nor any failed yet."""
        if u.key in status or u.key in started:
            return False
        return not all(stage_done(n) for n in u.needs) and not any(stage_failed(n) for n in u.needs)

    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    nodes = [
        {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    check_feasible(plan, sorted({u.stage for u in todo if u.key not in status}), total, nodes)
    used: dict[str, float] = {}
    holding: dict[ray.ObjectRef, dict[str, float]] = {}
    pools: dict[tuple, object] = {}  # pool_key -> HostPool, shared by its eval stages
    pool_holding: dict[tuple, dict[str, float]] = {}

    running: dict[ray.ObjectRef, list[StageRun]] = {}
    started: dict[str, float] = {}
    retries: dict[str, int] = {}  # units that lost a worker: how often so far
    not_before: dict[str, float] = {}  # ... and when they may run again
    plan_json = plan.model_dump_json()
    view = _Progress(todo, status, started) if progress else None
    try:
        while True:
            for u in todo:
                if u.key in status or u.key in started or not_before.get(u.key, 0) > time.time():
                    continue
                if any(stage_failed(n) for n in u.needs):
                    status[u.key] = UnitStatus(State.BLOCKED)
                    continue
                if not all(stage_done(n) for n in u.needs):
                    continue
                stage = plan.stages[u.stage]
                pooled = stage.kind == "eval" and stage.hosts
                if pooled and any(unsettled(v) for v in todo if v.stage == u.stage):
                    continue  # one pool for all the stage's models: wait for their trainings
                need = unit_need(plan, u.stage, total)
                if pooled and pool_key(plan, u.stage) in pools:
                    need = {}  # its pool already holds the devices
                if not fits(need, used, total):
                    continue  # it starts when running units free what it holds
                # Every finished stage: a training stage also reads its data's vectors.
                input_dirs = {n: str(d) for n, d in dirs.items() if stage_done(n)}
                if pooled:
                    # The stage's ready models go together, in turn on one pool.
                    group = [
                        v
                        for v in todo
                        if v.stage == u.stage
                        and v.key not in status
                        and v.key not in started
                        and not_before.get(v.key, 0) <= time.time()
                        and all(stage_done(n) for n in v.needs)
                    ]
                    key = pool_key(plan, u.stage)
                    if key not in pools:
                        try:
                            pools[key] = S.stage_pool(plan, u.stage)
                        except IntrospectError as e:
                            status.update({v.key: UnitStatus(State.FAILED, str(e)) for v in group})
                            continue
                        pool_holding[key] = need
                        used, need = add(used, need), {}
                    ref = _execute_pooled.options(name=f"stage:{u.stage}").remote(
                        plan_json, group, input_dirs, storage, pools[key], retries
                    )
                else:
                    group = [u]
                    # Named after the unit, so Ray's state API and dashboard say which stage
                    # runs where (`ray list tasks --filter name=stage:b1[base]`).
                    options = {"name": f"stage:{u.key}", **_remote_options(plan, u)}
                    ref = _execute_remote.options(**options).remote(
                        plan_json, u, input_dirs, storage, retries.get(u.key, 0)
                    )
                holding[ref] = need
                used = add(used, need)
                running[ref] = group
                started.update({v.key: time.time() for v in group})
            if view:
                view.update()
            if not running:
                if not [k for k in not_before if k not in status and k not in started]:
                    break
                time.sleep(0.5)  # only retries are left, waiting out their backoff
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                group = running.pop(ref)
                used = add(used, holding.pop(ref), -1.0)
                try:
                    failed = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task itself died (its node, ...)
                    failed = dict.fromkeys((u.key for u in group), (failure_line(e), is_lost(e)))
                for u in group:
                    if u.key not in failed:
                        status[u.key] = UnitStatus(State.DONE)
                        continue
                    line, lost = failed[u.key]
                    n = retries.get(u.key, 0)
                    wait = retry_delay(plan, lost, n)
                    if wait is not None:
                        retries[u.key], not_before[u.key] = n + 1, time.time() + wait
                        del started[u.key]
                        print(f"stages.{u.key}: {line}; retry {n + 1} of {plan.retry.lost} in "
                              f"{wait:g} s", file=sys.stderr)  # fmt: skip
                        continue
                    if lost and n:
                        line = f"{line} (lost {n + 1} times)"
                    status[u.key] = UnitStatus(State.FAILED, line)
                    if fail_fast:
                        raise IntrospectError(f"stages.{u.key}: {line}") from None
            for key in [k for k in pools if not any(
                plan.stages[v.stage].kind == "eval" and plan.stages[v.stage].hosts
                and pool_key(plan, v.stage) == k and v.key not in status for v in todo
            )]:  # fmt: skip
                pools.pop(key).close()  # no stage left for it: free its devices
                used = add(used, pool_holding.pop(key), -1.0)
    finally:
        for pool in pools.values():
            pool.close()
        if view:
            view.close()
    write_json(root / "status.json", {k: str(v) for k, v in status.items()})
    return status


class _Progress:
    """A live table: one line per unit with its state and elapsed time."""

    def __init__(self, todo: list[StageRun], status: dict, started: dict):
        from rich.console import Console
        from rich.live import Live

        self.todo, self.status, self.started = todo, status, started
        self.t0 = time.time()
        self.console = Console(stderr=True)
        self.seen: dict[str, str] = {}
        # A live table on a terminal; one line per change of state in a log file.
        self.live = None
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2)
            self.live.start()

    def _table(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"plan stages ({time.time() - self.t0:.0f} s)")
        for col in ("stage", "state", "time"):
            table.add_column(col)
        for u in self.todo:
            state = self._state(u)
            t = self.started.get(u.key)
            elapsed = f"{time.time() - t:.0f} s" if t and u.key not in self.status else ""
            style = {"done": "green", "skipped": "dim", "running": "yellow"}.get(
                state.split(":")[0], "red" if state.startswith(("failed", "blocked")) else ""
            )
            shown = escape(state)
            table.add_row(escape(u.key), f"[{style}]{shown}[/]" if style else shown, elapsed)
        return table

    def _state(self, u: StageRun) -> str:
        if u.key in self.status:
            return str(self.status[u.key])
        return "running" if u.key in self.started else "waiting"

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            return
        for u in self.todo:
            state = self._state(u)
            if self.seen.get(u.key) != state and state != "waiting":
                self.seen[u.key] = state
                print(f"[{time.time() - self.t0:6.0f} s] {u.key}: {state}", file=sys.stderr)

    def close(self) -> None:
        self.update()
        if self.live is not None:
            self.live.stop()
