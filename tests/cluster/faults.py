"""Fault scenarios on the namespace cluster: one plan, run once clean and then once per fault,
each faulted run compared by key with the clean one.

The plan (`fault_plan`) is tiny.yaml's vectors and data stages, three 200-step trainings that
start at once (three CPUs' worth, more than the head's two, so Ray puts one or more on the
worker), and B1 over the base and the three on a pool of three model hosts (PACK: two on the
head, one on the worker). Each run has its own name, so its own run directory and Ray Train
storage; the stage hashes do not depend on the name, so every run computes the same thing.

    host-train    every Ray process of the worker host killed (`ray stop --force`; sshd
                  stays, so the head's autoscaler restarts it, as a rebooted box) once a
                  checkpoint at step KILL_STEP or later is in a training's Ray Train storage
                  (checkpoints every 25 steps) and a Ray Train worker lives there
    host-fanout   the same, once B1's fan-out has merged its first shard and a model host lives
                  on the worker
    train-worker  one Ray Train worker process SIGKILLed (its host lives on) at step KILL_STEP
    driver        the job's driver (`introspect run`) SIGKILLed at step KILL_STEP; the plan is
                  then submitted again, as a user would

`compare` reads both run directories: every B1 row of every model exactly once (the rows'
inputs as the key) with the same p_yes, B1 metrics, trainings' metrics and final weights.
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
from collections import Counter
from pathlib import Path

import harness as ch
import numpy as np
import pandas as pd
import yaml
from safetensors.numpy import load_file

SCENARIOS = ("host-train", "host-fanout", "train-worker", "driver")
TRAININGS = ("a", "b", "c")
KILL_STEP = 50  # of 200: a checkpoint at 50 is in storage, most of the run is still to come
BASE = Path("tests/plans/tiny.yaml")
# Timings, paths and counters: they differ between runs by nature.
UNCOMPARED = {"run_dir", "wall_s", "worker_hours", "gpu_hours", "restarts", "num_workers"}
SCORES = ("p_yes", "yes_no_mass")  # B1's outputs; every other column of a row is its key
# The head's autoscaler restarts a lost worker's Ray within about a minute when it does; in one CI
# run it never did (20 min). Past this grace the harness starts it as the autoscaler would, and
# the run's record says who did: the claim under test is the runner's and Ray Train's recovery
# once a node is back, not the autoscaler's.
AUTOSCALER_GRACE_S = 180
HOST_FAULTS = ("host-train", "host-fanout")


def fault_plan(base: dict, name: str) -> dict:
    """tiny.yaml's vectors and data, three trainings at once, B1 over them on three hosts."""
    plan = {k: copy.deepcopy(v) for k, v in base.items() if k != "stages"}
    plan["name"] = name
    s = base["stages"]
    stages = {"random": s["random"], "data": {**s["data"], "n": 96}}
    train = {"max_steps": 200, "batch_size": 4, "warmup_steps": 10, "lr": 1.0e-3,
             "eval_every": 50, "save_every": 25}
    for seed, t in enumerate(TRAININGS):
        stages[t] = {"kind": "train", "preset": "original", "data": "data",
                     "overrides": {**train, "seed": seed}}
    stages["b1"] = {"kind": "eval", "suite": "detection", "models": ["base", *TRAININGS],
                    "vectors": ["random"], "hosts": 3,
                    "options": {"n_per_tier": 256, "magnitudes": [8.0, 16.0],
                                "magnitude_mode": "absolute", "batch_size": 8,
                                "min_mass": 0.0}}
    plan["stages"] = stages
    return plan


# ---- the moment to strike ---------------------------------------------------------------


def train_steps(root: Path) -> dict[str, int]:
    """The step of each training's latest checkpoint in its Ray Train storage (a running
    training's own log is written to its run directory only at the end)."""
    steps = {}
    for t in TRAININGS:
        for log in (root / "ray" / f"{root.name}-{t}").glob("checkpoint_*/log.jsonl"):
            lines = log.read_text().splitlines()
            if lines:
                try:
                    steps[t] = max(steps.get(t, 0), json.loads(lines[-1])["step"])
                except (ValueError, KeyError):
                    pass  # being written
    return steps


def shard_files(root: Path) -> int:
    """B1's merged shards kept so far (`.shards-<model>/`, removed once a model is done)."""
    return sum(1 for _ in (root / "b1").glob("*/.shards-*/*.parquet"))


def wait_for(what: str, check, timeout: float = 400, every: float = 0.2):
    """Poll `check()` until it returns something true; return that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def mid_training(h, name: str) -> dict:
    root = h.plan_dir(name)
    wait_for(f"a training of {name} past step {KILL_STEP}",
             lambda: max(train_steps(root).values(), default=0) >= KILL_STEP)
    return {"steps": train_steps(root)}


# ---- the faults -------------------------------------------------------------------------


def kill_host_ray(h, host: str) -> str:
    """Take every Ray process of a host down hard, `ray stop --force` in its PID namespace
    (sshd stays, so the head's autoscaler can restart it). A `pkill -9` of the same processes
    left a worker the autoscaler never restarted (seen once, not traced)."""
    r = h.on(host, ["ray", "stop", "--force"], timeout=60, check=False)
    return (r.stdout + r.stderr).strip()[-200:]


def host_train(h, name: str, job: str) -> dict:
    at = mid_training(h, name)

    # The three trainings start together, but one whose worker lands on the worker host can
    # be alive a while after the first is past KILL_STEP there (its Ray worker sets up the
    # job's environment first; seen once in CI): wait for it rather than strike too early.
    def on_worker() -> dict | None:
        actors = h.probe("actors", ch.DASHBOARD, job)
        return actors if any(w["ip"] == ch.WORKER_IP for w in actors["train_workers"]) else None

    actors = wait_for("a Ray Train worker on the worker host", on_worker, timeout=300, every=2)
    at["train_workers"] = actors["train_workers"]
    at["killed"] = kill_host_ray(h, "worker")
    at["steps_at_kill"] = train_steps(h.plan_dir(name))
    return at


def host_fanout(h, name: str, job: str) -> dict:
    root = h.plan_dir(name)
    wait_for("B1's first merged shard", lambda: shard_files(root) > 0)
    actors = h.probe("actors", ch.DASHBOARD, job)  # the pool is placed by now
    if not any(a["ip"] == ch.WORKER_IP for a in actors["model_hosts"]):
        raise RuntimeError(f"no model host on the worker host: {actors}")
    killed = kill_host_ray(h, "worker")
    return {"model_hosts": actors["model_hosts"], "shards_at_kill": shard_files(root),
            "killed": killed}


def train_worker(h, name: str, job: str) -> dict:
    at = mid_training(h, name)
    workers = h.probe("actors", ch.DASHBOARD, job)["train_workers"]
    victim = workers[0]
    host = "worker" if victim["ip"] == ch.WORKER_IP else "head"
    r = h.on(host, ["kill", "-9", str(victim["pid"])], check=False)
    at.update(victim=victim, host=host, kill_rc=r.returncode,
              steps_at_kill=train_steps(h.plan_dir(name)))
    return at


def driver(h, name: str, job: str) -> dict:
    at = mid_training(h, name)
    r = h.on("head", ["pkill", "-9", "-e", "-f", "introspect run"], check=False)
    at.update(killed=r.stdout.strip()[-300:], steps_at_kill=train_steps(h.plan_dir(name)))
    return at


def alive_workers(h) -> set[str]:
    """Node ids of the alive Ray nodes on the worker's IP."""
    return {n["node_id"] for n in h.alive() if n["node_ip"] == ch.WORKER_IP}


def start_worker_ray(h) -> dict:
    """Start the worker's Ray with ray_cluster.yaml's own worker start commands, over SSH, as
    the autoscaler's updater does."""
    config = yaml.safe_load(ch.CONFIG.read_text())
    command = "; ".join(config["worker_start_ray_commands"]).replace("$RAY_HEAD_IP", ch.HEAD_IP)
    r = h.ssh("worker", command, timeout=180, check=False)
    return {"rc": r.returncode, "tail": (r.stdout + r.stderr).strip()[-300:]}


BUSY = ("waiting-for-ssh", "syncing-files", "setting-up")  # the autoscaler's updater, mid-way
_STATUS = re.compile(r"New status: ([a-z-]+)")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def updater_statuses(h) -> list[str]:
    """The head autoscaler's node-updater statuses so far (monitor.out; the worker is its only
    node): BUSY ones while it restarts the worker's Ray, then up-to-date or update-failed."""
    logs = sorted((h.hosts["head"].dir / "tmp" / "ray").glob("session_2*/logs/monitor.out"),
                  key=lambda f: f.stat().st_mtime)
    if not logs:
        return []
    return _STATUS.findall(_COLOUR.sub("", logs[-1].read_text(errors="replace")))


def start_until_back(h, back, deadline: float) -> list[dict]:
    """Start the worker's Ray (start_worker_ray) until `back()` or the deadline. Under load a
    `ray start` can give up waiting for its raylet to register (Ray's fixed 30 s: "The current
    node timed out during startup"), which is also why the autoscaler's own restart fails
    (update-failed) and it does not try again; so try again."""
    starts = []
    while time.time() < deadline and not back():
        starts.append(start_worker_ray(h))
        settle = time.time() + (60 if starts[-1]["rc"] == 0 else 10)
        while time.time() < min(settle, deadline) and not back():
            time.sleep(3)
    return starts


def monitor_tail(h, n: int = 15) -> list[str]:
    """The head autoscaler's last lines about the worker (why it did not restart it)."""
    logs = sorted((h.hosts["head"].dir / "tmp" / "ray").glob("session_2*/logs/monitor.log"),
                  key=lambda f: f.stat().st_mtime)
    if not logs:
        return []
    lines = logs[-1].read_text(errors="replace").splitlines()
    return [x[-300:] for x in lines if ch.WORKER_IP in x or "pdate" in x][-n:]


class WorkerBack(threading.Thread):
    """Watches for the worker's Ray to come back after a host fault: a node on the worker's IP
    that was not alive before the kill. Past AUTOSCALER_GRACE_S the harness starts it itself.
    `record` says who brought it back and when."""

    def __init__(self, h, before: set[str]):
        super().__init__(daemon=True)
        self.h, self.before, self.t0 = h, before, time.time()
        self.record: dict = {}

    def back(self) -> bool:
        return bool(alive_workers(self.h) - self.before)

    def run(self) -> None:
        # Past the grace, an updater still mid-restart gets as long again: a second `ray stop;
        # ray start` from the harness in the middle of its own would undo it. One that failed
        # (update-failed since the kill) does not try again: the harness starts at once.
        seen = len(updater_statuses(self.h))
        while True:
            if self.back():
                self.record = {"by": "autoscaler", "after_s": round(time.time() - self.t0, 1)}
                return
            since = updater_statuses(self.h)[seen:]
            waited = time.time() - self.t0
            if "update-failed" in since or waited > 2 * AUTOSCALER_GRACE_S or (
                waited > AUTOSCALER_GRACE_S and (not since or since[-1] not in BUSY)
            ):
                break
            time.sleep(5)
        self.record = {"by": "harness", "updater": since, "monitor": monitor_tail(self.h)}
        self.record["starts"] = start_until_back(self.h, self.back,
                                                 self.t0 + 4 * AUTOSCALER_GRACE_S)
        self.record["after_s"] = round(time.time() - self.t0, 1)
        self.record["back"] = self.back()


def whole_cluster(h, timeout: float = 120) -> dict:
    """Both nodes alive before a run starts, so one run's lost worker is not the next run's
    fault: waits for them, then starts the worker's Ray itself if it is still gone."""
    try:
        return {"waited_s": h.wait_nodes(2, timeout=timeout)}
    except RuntimeError:
        out = {"monitor": monitor_tail(h)}
        out["starts"] = start_until_back(h, lambda: len(h.alive()) >= 2, time.time() + 420)
        out["waited_s"] = h.wait_nodes(2, timeout=60)
        return out


FAULTS = {"host-train": host_train, "host-fanout": host_fanout, "train-worker": train_worker,
          "driver": driver}


# ---- one run ----------------------------------------------------------------------------


def write_plan(h, name: str) -> str:
    """The plan file, inside the repo (submit takes plans there); the harness removes it."""
    base = yaml.safe_load((ch.REPO / BASE).read_text())
    h.plans_dir.mkdir(exist_ok=True)
    path = h.plans_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fault_plan(base, name), sort_keys=False))
    return str(path.relative_to(ch.REPO))


def summary(output: str) -> str:
    """The runner's last line (`N ran, M skipped, K failed → report`), or ''."""
    return next((x for x in output.splitlines() if " ran, " in x), "")


def tries(root: Path) -> dict[str, dict]:
    """Per unit that needed them: the runner's retries, Ray Train's worker-group restarts, and
    a fan-out's shards run again on another host."""
    out = {}
    for t in root.glob("**/timing.json"):
        timing = json.loads(t.read_text())
        n = {
            k: timing[k]
            for k in ("retries", "restarts", "shard_retries", "hosts_revived", "shard_backups")
            if timing.get(k)
        }
        stage, _hash, *model = t.parent.relative_to(root).parts  # b1/<hash>/<model>
        if n:
            out[stage + "".join(f"[{m}]" for m in model)] = n
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary directories and shard caches still there once the plan is over."""
    return sorted(str(p.relative_to(root)) for p in root.glob("**/.*")
                  if p.is_dir() and p.name.startswith((".tmp-", ".shards-")))


def run(h, scenario: str, i: int) -> dict:
    """Submit the fault plan, inject `scenario`'s fault at its moment, wait for the end (and
    resubmit once for the driver); compare with the clean run."""
    name = f"faults-{scenario}-{i}"
    plan = write_plan(h, name)
    before = whole_cluster(h)
    decisions = len(h.train_decisions("head")) + len(h.train_decisions("worker"))
    t0 = time.time()
    job = h.job_id(h.submit_plan(plan, wait=False))
    out = {"scenario": scenario, "run": i, "job": job}
    if "starts" in before:
        out["cluster_before"] = before
    workers = alive_workers(h)
    out["fault"] = FAULTS[scenario](h, name, job)
    t = time.time()
    out["fault_after_submit_s"] = round(t - t0, 1)
    watcher = WorkerBack(h, workers) if scenario in HOST_FAULTS else None
    if watcher:
        watcher.start()
    out["status"] = h.wait_job(job, timeout=900)
    out["job_s_after_fault"] = round(time.time() - t, 1)
    if scenario == "driver":
        t = time.time()
        again = h.submit_plan(plan, timeout=900)
        out["resubmit"] = {"rc": again.returncode, "s": round(time.time() - t, 1),
                           "summary": summary(again.stderr)}
        if again.returncode:
            out["resubmit"]["tail"] = (again.stdout + again.stderr)[-3000:]
    else:
        logs = h.job("logs", job).stdout
        out["summary"] = summary(logs)
        out["retry_lines"] = [x for x in logs.splitlines() if "; retry " in x][:10]
    root = h.plan_dir(name)
    out["units"] = h.plan_status(name, since=t0)
    out["tries"] = tries(root)
    after = h.train_decisions("head") + h.train_decisions("worker")
    out["train_decisions"] = len(after) - decisions
    out["leftovers"] = leftovers(root)
    out["total_s"] = round(time.time() - t0, 1)
    try:
        out["compare"] = compare(h.plan_dir("faults-clean"), root)
    except Exception as e:  # noqa: BLE001 - e.g. an output missing: kept in the run's record
        out["compare"] = {"error": repr(e)}
    if watcher:
        watcher.join()
        out["worker_back"] = watcher.record
    return out


# ---- the comparison ---------------------------------------------------------------------


def _unit(root: Path, stage: str) -> Path:
    [d] = [p for p in (root / stage).iterdir() if not p.name.startswith(".")]
    return d


def _leaves(x, path: str = "") -> dict[str, float]:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() if key not in UNCOMPARED
                for k, v in _leaves(val, f"{path}.{key}" if path else key).items()}
    if isinstance(x, list):
        return {k: v for n, val in enumerate(x) for k, v in _leaves(val, f"{path}[{n}]").items()}
    if isinstance(x, bool) or not isinstance(x, int | float):
        return {path: x}
    return {path: float(x)}


def metrics_diff(a: dict, b: dict, names: tuple[str, str] = ("", "")) -> float:
    """The largest difference between two metrics files' numbers (inf if their shapes or any
    non-number differ); timings and counters are not compared. ``names``: the two runs' plan
    names, which paths in `b` have where `a`'s have the other."""
    la, lb = _leaves(a), _leaves(b)
    lb = {k: v.replace(f"/{names[1]}/", f"/{names[0]}/") if isinstance(v, str) and names[1]
          else v for k, v in lb.items()}
    if la.keys() != lb.keys():
        return math.inf
    worst = 0.0
    for k, va in la.items():
        vb = lb[k]
        if isinstance(va, float) and isinstance(vb, float):
            if math.isnan(va) and math.isnan(vb):
                continue
            worst = max(worst, abs(va - vb))
        elif va != vb:
            return math.inf
    return worst


def rows_diff(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """B1 rows of one model in two runs, keyed by their inputs: how many of `a`'s keys `b`
    lacks, how many it has that `a` has not (a row twice counts once extra), and the largest
    p_yes difference between rows of the same key."""
    keys = [c for c in a.columns if c not in SCORES]

    def keyed(df: pd.DataFrame) -> pd.DataFrame:
        k = ["|".join(map(str, t)) for t in df[keys].itertuples(index=False, name=None)]
        return df.assign(_k=k).sort_values(["_k", "p_yes"], ignore_index=True)

    ka, kb = keyed(a), keyed(b)
    ca, cb = Counter(ka["_k"]), Counter(kb["_k"])
    out = {"rows": len(b), "missing": sum((ca - cb).values()), "extra": sum((cb - ca).values())}
    if out["missing"] == out["extra"] == 0:
        out["max_p_yes_diff"] = float(np.max(np.abs(ka["p_yes"].to_numpy()
                                                    - kb["p_yes"].to_numpy())))
    return out


def compare(clean: Path, run: Path) -> dict:
    """What of `run` differs from `clean`: B1 rows and metrics per model; per training its
    metrics and its final weights (largest absolute difference)."""
    out = {"b1": {}, "train": {}}
    names = (clean.name, run.name)
    b1_clean, b1_run = _unit(clean, "b1"), _unit(run, "b1")
    for model in ("base", *TRAININGS):
        a, b = b1_clean / model, b1_run / model
        d = rows_diff(pd.read_parquet(a / "scores.parquet"), pd.read_parquet(b / "scores.parquet"))
        d["metrics_diff"] = metrics_diff(json.loads((a / "metrics.json").read_text()),
                                         json.loads((b / "metrics.json").read_text()), names)
        out["b1"][model] = d
    for t in TRAININGS:
        a, b = _unit(clean, t), _unit(run, t)
        wa = load_file(a / "run" / "final" / "adapter_model.safetensors")
        wb = load_file(b / "run" / "final" / "adapter_model.safetensors")
        diff = (max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
                if wa.keys() == wb.keys() else math.inf)
        worker = json.loads((b / "run" / "worker.json").read_text())
        out["train"][t] = {
            "max_weight_diff": diff,
            "metrics_diff": metrics_diff(json.loads((a / "metrics.json").read_text()),
                                         json.loads((b / "metrics.json").read_text()), names),
            "resumed_from": worker.get("resumed_from"),
        }
    return out


def worst(compared: dict) -> dict:
    """The comparison in four numbers, for the assertions and the table."""
    b1 = compared["b1"].values()
    return {
        "missing_or_extra_rows": sum(d["missing"] + d["extra"] for d in b1),
        "max_p_yes_diff": max(d.get("max_p_yes_diff", math.inf) for d in b1),
        "max_b1_metrics_diff": max(d["metrics_diff"] for d in b1),
        "max_train_diff": max(max(d["max_weight_diff"], d["metrics_diff"])
                              for d in compared["train"].values()),
    }


def clean_run(h) -> dict:
    """The fault plan with no fault: what every faulted run is compared with."""
    plan = write_plan(h, "faults-clean")
    t = time.time()
    r = h.submit_plan(plan, timeout=900)
    out = {"rc": r.returncode, "s": round(time.time() - t, 1), "summary": summary(r.stderr)}
    if r.returncode:
        out["tail"] = (r.stdout + r.stderr)[-3000:]
    return out


def table(records: list[dict]) -> str:
    """docs/cluster.md's table from runs' records (test-artifacts/cluster-faults.json): one
    row per scenario, with the spread over its runs."""

    def spread(xs) -> str:
        xs = sorted(xs)
        return f"{xs[0]:.0f}" if xs[0] == xs[-1] else f"{xs[0]:.0f}–{xs[-1]:.0f}"

    rows = ["| scenario | runs | outcome | who ran the lost work again | fault after submit (s) "
            "| job after fault (s) | trainings resumed from | rows missing/extra, max Δp_yes, "
            "Δmetrics, Δweights |",
            "|---|---|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        runs = [r for r in records if r["scenario"] == scenario]
        if not runs:
            continue
        ok = [r["status"] == "SUCCEEDED" or r.get("resubmit", {}).get("rc") == 0 for r in runs]
        who = Counter(f"{u}: {k} {n}" for r in runs for u, t in r["tries"].items()
                      for k, n in t.items())
        w = [r.get("worst", {}) for r in runs]
        diffs = (f"{sum(x.get('missing_or_extra_rows', 0) for x in w)}, "
                 + ", ".join(f"{max(x.get(k, math.inf) for x in w):.1g}" for k in
                             ("max_p_yes_diff", "max_b1_metrics_diff", "max_train_diff")))
        job = [r["job_s_after_fault"] + r.get("resubmit", {}).get("s", 0) for r in runs]
        resumed = [f"{t} {d['resumed_from'].removeprefix('step-').lstrip('0')}"
                   for r in runs for t, d in r.get("compare", {}).get("train", {}).items()
                   if d.get("resumed_from")]
        back = Counter(r["worker_back"].get("by") for r in runs if r.get("worker_back"))
        rows.append(
            f"| {scenario} | {len(runs)} | {sum(ok)} of {len(runs)} completed"
            f"{' (resubmitted)' if scenario == 'driver' else ', no resubmission'}"
            f"{''.join(f'; worker back by the {k} ×{n}' for k, n in sorted(back.items()))} | "
            f"{'; '.join(f'{k} ×{n}' for k, n in sorted(who.items())) or 'no unit counted one'}"
            f" (Ray Train decisions: {sum(r['train_decisions'] for r in runs)}) | "
            f"{spread(r['fault_after_submit_s'] for r in runs)} | {spread(job)} | "
            f"{', '.join(resumed) or 'none'} | {diffs} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(table(json.loads(Path(sys.argv[1]).read_text())))
