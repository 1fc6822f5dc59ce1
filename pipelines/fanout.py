"""Evaluation fan-out: a table split into shards, mapped over a ModelHost pool, merged by key.

Shards are handed out dynamically (a host that finishes takes the next shard). Each shard runs
``fn(lm, shard, *args, **kwargs)`` on a host through ``ModelHost.call``; ``fn`` must return a
DataFrame holding the shard's key columns, one row per key. Shards are idempotent, so a shard
whose host dies (actor died, node lost, result lost) is simply run again on another live host;
results are merged by key, so a retried shard can neither duplicate nor drop rows.

A host that died is probed in the background: Ray restarts it (``max_restarts``) and, once it
answers again, it rejoins the pool. A host can also hold a shard without dying or answering: it
hangs, or Ray is restarting it on a node that keeps failing to come back (its calls wait in its
queue meanwhile). So once every shard has been handed out, a shard still running well past the
others (``straggler_s``) is started again on an idle host; the first copy to finish is kept.

With ``cache``, each merged shard is also written there (parquet, named by a digest of the
function, the adapter, its arguments and the shard's rows), and a later fan-out over the same
work reads it instead of running it: a stage the runner retries after losing its driver runs
only the shards it had not finished.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import statistics
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import ray
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from introspect.errors import IntrospectError
from introspect.examples import score_examples
from introspect.runs import evaluated_parts
from introspect.vectors import VectorSet

log = logging.getLogger(__name__)

# Errors that mean "the host (or its node) went away", not "fn failed on these rows".
HOST_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)


class _AsIs:
    def __repr__(self) -> str:
        return "AS_IS"


AS_IS = _AsIs()  # fan_out(adapter=AS_IS): run under whatever adapter each host has active


def fan_out(
    hosts: Sequence,
    fn: Callable,
    rows: pd.DataFrame,
    key: str | list[str],
    shard_size: int,
    *args,
    adapter: str | os.PathLike | None | _AsIs = AS_IS,
    progress: bool = True,
    max_shard_retries: int = 3,
    revive_timeout_s: float = 120.0,
    straggler_s: float = 60.0,
    cache: str | os.PathLike | None = None,
    **kwargs,
) -> pd.DataFrame:
    """``fn(lm, shard, *args, **kwargs)`` over every shard of ``rows``, on a pool of ModelHosts.

    Returns fn's rows for all shards, in the input order and with the input's index; every input
    key appears exactly once. ``adapter`` pins the adapter each shard runs under (a name, a LoRA
    directory, or None for the base); pin it whenever the pool switched adapters, since a host
    restarted by Ray comes back with its constructor adapter. ``args``/``kwargs`` are put in the
    object store once and shared by all shards. A shard is tried at most
    ``1 + max_shard_retries`` times; when no host is left alive and none comes back within
    ``revive_timeout_s`` the fan-out fails. Once no shard is left to hand out, a shard running
    longer than ``straggler_s`` (or three times the median shard, if longer) while a host is idle
    also runs on that host, once; the first copy to finish is kept. ``cache``: a directory where
    merged shards are kept and found again (see the module's doc). Counts of shards, retries,
    backup copies and shards read from the cache are in ``result.attrs["fan_out"]``.
    """
    keys = [key] if isinstance(key, str) else list(key)
    hosts = list(hosts)
    _check(hosts, rows, keys, shard_size, max_shard_retries)
    shards = [rows.iloc[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    files = _shard_files(cache, fn, adapter, args, kwargs, shards)
    args = [ray.put(a) for a in args]  # top-level refs are resolved by Ray before the call
    kwargs = {k: ray.put(v) for k, v in kwargs.items()}

    def submit(i: int, host):
        if adapter is AS_IS:
            call = host.call.options(max_task_retries=0)
            return call.remote(fn, shards[i], *args, **kwargs)
        call = host.call_as.options(max_task_retries=0)  # we retry, on another host
        return call.remote(adapter, fn, shards[i], *args, **kwargs)

    results: dict[int, pd.DataFrame] = {
        i: pd.read_parquet(f) for i, f in enumerate(files) if f is not None and f.exists()
    }
    todo = deque(i for i in range(len(shards)) if i not in results)
    idle = list(hosts)
    running: dict = {}  # ref -> (shard, host, when it was handed out)
    probes: dict = {}  # ref -> host that died and may come back
    failures: Counter = Counter()
    backed: set[int] = set()  # shards that have had a backup copy
    took: list[float] = []  # seconds of each finished shard
    stats = {"shards": len(shards), "hosts": len(hosts), "retries": 0, "revived": 0,
             "backups": 0, "cached": len(results)}  # fmt: skip

    def hand_out(i: int, host) -> None:
        running[submit(i, host)] = (i, host, time.monotonic())

    def copies(i: int) -> int:
        return sum(j == i for j, _, _ in running.values())

    def straggler() -> tuple[float, int] | None:
        """(seconds until it is late, shard) for the oldest running shard without a backup;
        None when a backup cannot help (work is still queued, no host is idle, or every
        running shard has one)."""
        unbacked = [(t, i) for i, _, t in running.values() if i not in backed]
        if todo or not idle or not unbacked:
            return None
        limit = max(straggler_s, 3 * statistics.median(took)) if took else straggler_s
        t, i = min(unbacked)
        return max(0.0, t + limit - time.monotonic()), i

    with _progress(progress, len(shards), getattr(fn, "__name__", "fn")) as advance:
        while len(results) < len(shards):
            while todo and idle:
                hand_out(todo.popleft(), idle.pop(0))
            if not running and not probes:
                raise IntrospectError(
                    f"hosts: all {len(hosts)} hosts died and cannot restart; "
                    f"{len(todo)} of {len(shards)} shards not done"
                )
            late = straggler()
            if late and late[0] == 0.0:
                i = late[1]
                log.warning("shard %d runs past the others: a backup copy on an idle host", i)
                backed.add(i)
                stats["backups"] += 1
                hand_out(i, idle.pop(0))
                continue
            wait_s = late[0] if late else (None if running else revive_timeout_s)
            ready, _ = ray.wait([*running, *probes], num_returns=1, timeout=wait_s)
            if not ready:
                if running:
                    continue  # a straggler's time has come
                raise IntrospectError(
                    f"hosts: all {len(hosts)} hosts died and none came back within "
                    f"{revive_timeout_s:.0f} s; {len(todo)} of {len(shards)} shards not done"
                )
            ref = ready[0]
            if ref in probes:
                host = probes.pop(ref)
                try:
                    ray.get(ref)
                except HOST_LOST:
                    continue  # out of restarts: gone for good
                idle.append(host)
                stats["revived"] += 1
                continue
            i, host, t0 = running.pop(ref)
            try:
                out = ray.get(ref)
            except HOST_LOST as e:
                # Ray restarts the host (same model); the probe returns once it answers again.
                probes[host.info.options(max_task_retries=-1).remote()] = host
                if i in results or copies(i):
                    continue  # the other copy finished or may still
                failures[i] += 1
                stats["retries"] += 1
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if failures[i] > max_shard_retries:
                    raise IntrospectError(
                        f"max_shard_retries: shard {i} (rows {_span(shards[i])}) lost its host "
                        f"{failures[i]} times; last: {reason}"
                    ) from None
                log.warning("shard %d lost its host (%s); retrying on another host", i, reason)
                todo.appendleft(i)
                continue
            except RayTaskError as e:
                # fn itself failed: deterministic, so a retry would fail the same way.
                if isinstance(e.cause, IntrospectError):
                    raise IntrospectError(str(e.cause)) from None
                raise
            idle.append(host)
            if i in results:
                continue  # the backup copy's twin finished first
            took.append(time.monotonic() - t0)
            results[i] = _in_key_order(out, shards[i], keys, i)
            if files[i] is not None:
                _keep(results[i], files[i])
            advance(stats["retries"])

    merged = pd.concat([results[i] for i in range(len(shards))])
    merged.index = rows.index
    if not pd.MultiIndex.from_frame(merged[keys]).equals(pd.MultiIndex.from_frame(rows[keys])):
        raise RuntimeError("fan_out: merged keys differ from the input keys (a bug in fan_out)")
    merged.attrs["fan_out"] = stats
    return merged


def _shard_files(cache, fn, adapter, args, kwargs, shards) -> list[Path | None]:
    """Where each shard's merged rows are kept in ``cache`` (None: no cache)."""
    if cache is None:
        return [None] * len(shards)
    try:
        work = hashlib.sha256(
            pickle.dumps((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)),
                          repr(adapter), args, kwargs))  # fmt: skip
        )
    except (pickle.PicklingError, TypeError, AttributeError) as e:  # a lambda, a lock, ...
        log.info("fan-out %s: shards not cached (%s)", getattr(fn, "__name__", "fn"), e)
        return [None] * len(shards)
    out = []
    for shard in shards:
        h = work.copy()
        h.update(pd.util.hash_pandas_object(shard, index=True).to_numpy().tobytes())
        out.append(Path(cache) / f"{h.hexdigest()[:24]}.parquet")
    return out


def _keep(frame: pd.DataFrame, path: Path) -> None:
    """Write one merged shard (atomically); a frame parquet cannot hold is just not kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        frame.to_parquet(tmp)
        os.replace(tmp, path)
    except (ValueError, TypeError, ImportError) as e:  # pyarrow's errors for odd columns
        tmp.unlink(missing_ok=True)
        log.info("shard not cached (%s): %s", path.name, e)


def score_on_pool(
    hosts: Sequence,
    examples: pd.DataFrame,
    vector_sets: dict[str, VectorSet],
    batch_size: int = 16,
    shard_size: int = 64,
    adapter: str | os.PathLike | None | _AsIs = AS_IS,
    progress: bool = True,
) -> pd.DataFrame:
    """``introspect.examples.score_examples`` over a pool: the same table, rows in input order.

    Rows are keyed by position, so the examples need no id column.
    """
    rows = examples.assign(_fan_out_row=range(len(examples)))
    args = (score_examples, rows, "_fan_out_row", shard_size, vector_sets, batch_size)
    scores = fan_out(hosts, *args, adapter=adapter, progress=progress)
    return scores.drop(columns="_fan_out_row")


def pool_mapper(
    hosts: Sequence,
    adapter: str | os.PathLike | None = None,
    shard_size: int = 64,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
    stats: list[dict] | None = None,
) -> Callable:
    """An evaluation mapper over a pool: ``mapper(fn, rows, **opts)`` runs ``fn(lm, shard,
    **opts)`` on the hosts, keyed by the rows' ``key`` column, like the in-process mapper
    (``introspect.evals.common.in_process``). Every shard runs under ``adapter`` (a loaded name,
    a LoRA directory, or None = the base), so one pool evaluates several adapters in turn.
    ``cache``: where finished shards are kept for a retry (:func:`fan_out`). ``stats``: a list
    each fan-out's counts (shards, hosts, retries, revived, cached) are appended to."""

    def mapper(fn: Callable, rows: pd.DataFrame, **opts) -> pd.DataFrame:
        out = fan_out(
            hosts, fn, rows, "key", shard_size, adapter=adapter, progress=progress,
            cache=cache, **opts,
        )  # fmt: skip
        # The stats would ride along into the parquet files; the in-process mapper has none.
        counts = out.attrs.pop("fan_out")
        log.info("fan-out %s: %s", getattr(fn, "__name__", "fn"), counts)
        if stats is not None:
            stats.append(counts)
        return out

    def call(fn: Callable, **opts):
        """``fn(lm, **opts)`` once, on the first live host (norms, concept vectors)."""
        for host in hosts:
            ref = host.call_as.options(max_task_retries=0).remote(adapter, fn, **opts)
            try:
                return ray.get(ref)
            except HOST_LOST:
                continue
            except RayTaskError as e:
                if isinstance(e.cause, IntrospectError):
                    raise IntrospectError(str(e.cause)) from None
                raise
        raise IntrospectError(f"hosts: all {len(hosts)} hosts died")

    mapper.call = call
    return mapper


def eval_pool(model: str, n: int, adapter: str | os.PathLike | None = None, **options):
    """``actors.host_pool(model, n, adapter, **options)`` for an evaluation's ``hosts`` option,
    whose errors about the pool's size then name ``hosts`` (host_pool calls it ``n``)."""
    from actors.model_host import host_pool

    try:
        return host_pool(model, n, adapter, **options)
    except IntrospectError as e:
        if str(e).startswith("n: "):
            raise IntrospectError(f"hosts: {str(e)[3:]}") from None
        raise


def pool_adapter(model: str, adapter: str | os.PathLike | None) -> str | None:
    """The LoRA directory under which a pool of ``model`` hosts evaluates ``adapter`` (a run
    directory, an adapter directory, or None = the base), by ``load_evaluated``'s rules.

    A fully fine-tuned model or a mid-run checkpoint is not an adapter of the pool's base."""
    base, adapter_dir, checkpoint = evaluated_parts(model, adapter)
    if checkpoint is not None or base != model:
        what = "a mid-run checkpoint" if checkpoint is not None else "a fully fine-tuned model"
        raise IntrospectError(
            f"adapter: {adapter} is {what}, not a LoRA adapter of {model}; "
            "evaluate it without hosts"
        )
    return None if adapter_dir is None else str(adapter_dir)


def _check(hosts, rows, keys, shard_size, max_shard_retries) -> None:
    if not hosts:
        raise IntrospectError("hosts: the pool is empty; start hosts with actors.host_pool(...)")
    if not isinstance(rows, pd.DataFrame) or rows.empty:
        raise IntrospectError("rows: nothing to evaluate (an empty or non-DataFrame table)")
    if shard_size < 1:
        raise IntrospectError(f"shard_size: {shard_size} must be >= 1")
    if max_shard_retries < 0:
        raise IntrospectError(f"max_shard_retries: {max_shard_retries} must be >= 0")
    missing = [k for k in keys if k not in rows.columns]
    if not keys or missing:
        raise IntrospectError(
            f"key: {missing or 'no column'} is not a column of the rows "
            f"(columns: {', '.join(map(str, rows.columns))})"
        )
    repeated = rows.duplicated(keys)
    if repeated.any():
        raise IntrospectError(
            f"key: {keys} is not unique ({int(repeated.sum())} rows repeat a key); "
            "add a unique id column and use it as the key"
        )


def _in_key_order(out, shard: pd.DataFrame, keys: list[str], i: int) -> pd.DataFrame:
    """fn's result for one shard, checked to hold each of the shard's keys once, in its order."""
    if not isinstance(out, pd.DataFrame) or any(k not in out.columns for k in keys):
        raise IntrospectError(
            f"fn: shard {i} returned {type(out).__name__} without the key columns {keys}; "
            "fn must return a DataFrame that keeps them"
        )
    want = pd.MultiIndex.from_frame(shard[keys])
    got = pd.MultiIndex.from_frame(out[keys])
    pos = got.get_indexer(want) if got.is_unique else None
    if pos is None or len(got) != len(want) or (pos < 0).any():
        raise IntrospectError(
            f"fn: shard {i} returned {len(got)} rows whose keys are not its {len(want)} keys "
            "exactly once"
        )
    return out.iloc[pos]


def _span(shard: pd.DataFrame) -> str:
    return f"{shard.index[0]}..{shard.index[-1]}"


@contextmanager
def _progress(enabled: bool, total: int, name: str):
    """Yield ``advance(retries)``: one shard done. A rich bar when enabled, else a no-op."""
    if not enabled:
        yield lambda retries: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(f"fan-out {name}", total=total)

        def advance(retries: int) -> None:
            suffix = f" ({retries} retried)" if retries else ""
            bar.update(task, advance=1, description=f"fan-out {name}{suffix}")

        yield advance
