"""ModelHost: a Ray actor that holds one model (plus switchable LoRA adapters) and serves it.

One host = one base model in one process: on a GPU cluster each host holds one GPU ("one 32B
model per A100"), on a CPU cluster it holds ``num_cpus`` CPUs. Adapters are loaded by name into
the same base (peft ``load_adapter``/``set_adapter``; the base itself is the adapter disabled),
so switching between a run's checkpoints never reloads the base weights. A fully fine-tuned
model directory is a different base: start another host for it.

Every method is a thin call into ``introspect``; ``call(fn, ...)`` runs any picklable
``fn(lm, ...)`` so an evaluation can fan out over a pool without a new actor method.

Restarts: a host that dies (node lost, OOM) is restarted by Ray with the same constructor
arguments, so it comes back with its *constructor* adapter. Code that switched adapters should
pass the adapter with each call (``call_as``), which ``pipelines.fanout.fan_out`` does.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from introspect.activations import layer_activations
from introspect.errors import IntrospectError
from introspect.evals.common import chat_ids
from introspect.evals.generation import Sampling, generate
from introspect.examples import score_examples
from introspect.logprobs import continuation_logprobs
from introspect.models import load
from introspect.vectors import VectorSet, load_vectors

log = logging.getLogger(__name__)


def _adapter_name(path: Path, taken: Mapping[str, str]) -> str:
    # peft keeps adapters in ModuleDicts, whose keys cannot hold "." (paths do).
    base = re.sub(r"\W", "_", path.name) or "adapter"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


class Host:
    """The plain object behind the ``ModelHost`` actor: one model, adapters by name.

    Usable without Ray (``info`` then reports no node and no GPUs), which is how the science it
    calls stays testable in one process.
    """

    def __init__(
        self,
        model: str,
        adapter: str | os.PathLike | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if device is None:
            # Fake GPUs (tests) and GPU-less builds of torch fall back to the CPU.
            device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        self.lm = load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.base_loads = 1
        self.adapters: dict[str, str] = {}  # name -> resolved directory
        self.active: str | None = None
        self._vectors: dict[str, VectorSet] = {}
        if adapter is not None:
            self.use_adapter(adapter)

    # -- adapters ------------------------------------------------------------------------------

    def use_adapter(self, adapter: str | os.PathLike | None) -> str | None:
        """Make ``adapter`` active: a loaded adapter's name, a LoRA directory, or None (base).

        A directory is loaded once (named after it) and reused afterwards; the base weights are
        never reloaded. Returns the active adapter's name.
        """
        if adapter is None:
            self.active = None
            return None
        if str(adapter) in self.adapters:
            name = str(adapter)
        else:
            path = Path(adapter)
            if not path.is_dir():
                known = ", ".join(self.adapters) or "none"
                raise IntrospectError(
                    f"adapter: {adapter} is neither a loaded adapter (loaded: {known}) "
                    "nor a directory"
                )
            if not (path / "adapter_config.json").is_file():
                raise IntrospectError(
                    f"adapter: {path} has no adapter_config.json, so it is not a LoRA adapter; "
                    f"a fully fine-tuned model is a different base: start a host with model={path}"
                )
            resolved = str(path.resolve())
            loaded = {p: n for n, p in self.adapters.items()}
            name = loaded.get(resolved) or self._load_adapter(path, resolved)
        self.lm.model.set_adapter(name)
        self.active = name
        return name

    def _load_adapter(self, path: Path, resolved: str) -> str:
        from peft import PeftModel

        name = _adapter_name(path, self.adapters)
        if isinstance(self.lm.model, PeftModel):
            self.lm.model.load_adapter(resolved, adapter_name=name)
        else:  # the first adapter wraps the base in place (LoRA layers are injected into it)
            self.lm.model = PeftModel.from_pretrained(self.lm.model, resolved, adapter_name=name)
        self.lm.model.eval()
        self.adapters[name] = resolved
        return name

    @contextmanager
    def _model(self):
        """The LoadedModel as the active adapter sees it (base = every adapter disabled)."""
        disable = getattr(self.lm.model, "disable_adapter", None)
        with disable() if self.active is None and callable(disable) else nullcontext():
            yield self.lm

    # -- serving -------------------------------------------------------------------------------

    def info(self) -> dict:
        """Where this host runs and what it serves."""
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "model": self.lm.name,
            "adapter": self.active,
            "adapter_path": self.adapters.get(self.active) if self.active else None,
            "adapters": dict(self.adapters),
            "node_id": ctx.get_node_id() if ctx else None,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ctx else [],
            "device": str(self.lm.device),
            "pid": os.getpid(),
            "actor_id": ctx.get_actor_id() if ctx else None,
            "base_loads": self.base_loads,
        }

    def score(
        self,
        examples: pd.DataFrame,
        vector_sets: Mapping[str, VectorSet] | Sequence[str | os.PathLike],
        batch_size: int = 16,
        info_prompt: str | None = None,
    ) -> pd.DataFrame:
        """Detection scores (``introspect.examples.score_examples``) of an examples table.

        ``vector_sets`` is a name -> VectorSet mapping, or vector file paths (named by stem).
        """
        if not isinstance(vector_sets, Mapping):
            vector_sets = {vs.name: vs for vs in map(self._vector_file, vector_sets)}
        return self.call(score_examples, examples, vector_sets, batch_size, info_prompt)

    def _vector_file(self, path: str | os.PathLike) -> VectorSet:
        key = str(Path(path).resolve())
        if key not in self._vectors:
            self._vectors[key] = load_vectors(path, self.lm.d_model)
        return self._vectors[key]

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        batch_size: int = 16,
        **sampling,
    ) -> list[str]:
        """Replies to user prompts (chat template) by ``introspect.evals.common.generate``.

        ``sampling``: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``. Each row
        samples with its own seed, so a reply does not depend on the shard it ran in.
        """
        with self._model() as lm:
            ids = [chat_ids(lm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
            return generate(lm, ids, Sampling(**sampling), seeds, batch_size=batch_size)

    def logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], **kwargs
    ) -> list[float]:
        """:func:`introspect.logprobs.continuation_logprobs` of the continuations."""
        return self.call(continuation_logprobs, prompts, continuations, **kwargs)

    def activations(
        self, texts: Sequence[str], layers: Sequence[int], batch_size: int = 16
    ) -> np.ndarray:
        """:func:`introspect.activations.layer_activations`: ``[N, len(layers), d_model]``."""
        return self.call(layer_activations, texts, layers, batch_size)

    def call(self, fn, *args, **kwargs):
        """``fn(lm, *args, **kwargs)`` under the active adapter; fn must be picklable."""
        with self._model() as lm:
            return fn(lm, *args, **kwargs)

    def call_as(self, adapter: str | os.PathLike | None, fn, *args, **kwargs):
        """:meth:`call` under ``adapter`` (name, directory or None = base), switching first.

        Self-contained, so a retried or restarted call cannot run under the wrong adapter.
        """
        self.use_adapter(adapter)
        return self.call(fn, *args, **kwargs)


# Calls are idempotent (nothing but the adapter choice is state), so Ray may retry them on a
# restarted host. fan_out overrides max_task_retries with 0 and retries on another host instead.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 2
ModelHost = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(Host)


@dataclass
class HostPool:
    """ModelHost actors and the placement group that reserves their GPUs (or CPUs)."""

    hosts: list
    pg: object = None
    infos: list[dict] = field(default_factory=list)
    wait_s: float = 0.0  # how long the pool waited for its reservation
    asked: int | None = None  # hosts asked for, where the pool started with fewer

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i):
        return self.hosts[i]

    def close(self) -> None:
        """Kill the hosts and release their reservation."""
        for h in self.hosts:
            ray.kill(h, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


CPU_MAX_HOSTS = 4  # each CPU host holds a whole copy of the model in RAM
PLACE_S = 30.0  # the least a pool that may start with fewer hosts waits for its reservation


def pool_size(
    n: int | None, num_cpus: float, max_hosts: int | None, resources: Mapping | None = None
) -> tuple[int, bool]:
    """``(hosts, on_gpus)`` for the connected cluster (or ``resources``): one per GPU, else
    CPUs // num_cpus."""
    resources = ray.cluster_resources() if resources is None else resources
    gpus = int(resources.get("GPU", 0))
    if gpus:
        if n is not None and n > gpus:
            raise IntrospectError(
                f"n: {n} hosts asked for but the cluster has {gpus} GPUs (one model per GPU)"
            )
        return n or min(gpus, max_hosts or gpus), True
    fit = int(resources.get("CPU", 0) // num_cpus)
    if fit < 1 or (n is not None and n > fit):
        raise IntrospectError(
            f"n: {n or 1} hosts of {num_cpus} CPUs do not fit in the cluster's "
            f"{resources.get('CPU', 0)} CPUs; lower num_cpus or n"
        )
    return n or min(fit, max_hosts or CPU_MAX_HOSTS), False


def host_pool(
    model: str,
    n: int | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    num_cpus: float = 1.0,
    max_hosts: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    max_restarts: int = MAX_RESTARTS,
    max_task_retries: int = MAX_TASK_RETRIES,
    timeout_s: float = 600.0,
    wait_for_cluster_s: float = 0.0,
    fewer_ok: bool = False,
) -> HostPool:
    """Start ``n`` ModelHosts: by default one per GPU (at most ``max_hosts`` when given), or on a
    CPU cluster as many as fit in its CPUs at ``num_cpus`` each, at most ``max_hosts`` (default 4).

    A placement group with one bundle per host ({"GPU": 1, "CPU": num_cpus} on GPU clusters,
    {"CPU": num_cpus} otherwise; PACK) reserves the whole pool at once, so each host owns one
    GPU. Returns when every host has loaded its model; a host that fails to load raises here.

    ``wait_for_cluster_s``: how long ``n`` hosts that do not fit in the cluster as it is now may
    wait for it to grow back (a lost node being restarted) before that is an error. The plan
    runner waits, having checked the plan against the whole cluster; a direct call does not.
    ``fewer_ok``: past that wait, start as many hosts as are free now (at least one) instead
    of failing; likewise when the cluster is whole but the hosts' reservation is not placed
    within ``wait_for_cluster_s`` (devices still held by other work). The pool's ``asked``
    then says how many were asked for. The runner does so, because a fan-out's results do not
    depend on how many hosts ran it.
    """
    if n is not None and n < 1:
        raise IntrospectError(f"n: {n} must be >= 1")
    if num_cpus <= 0:
        raise IntrospectError(f"num_cpus: {num_cpus} must be > 0")
    deadline = time.monotonic() + wait_for_cluster_s
    asked = None
    while True:
        try:
            size, on_gpus = pool_size(n, num_cpus, max_hosts)
            break
        except IntrospectError as short:
            if time.monotonic() < deadline:
                time.sleep(2)
                continue
            if not fewer_ok or n is None:
                raise
            free = ray.available_resources()  # of the cluster's kind of device only
            kind = "GPU" if ray.cluster_resources().get("GPU") else "CPU"
            try:  # the node never came back: go on with what is free now
                size, on_gpus = pool_size(None, num_cpus, n, {kind: free.get(kind, 0.0)})
            except IntrospectError:
                raise short from None
            asked = n
            log.warning("%s; starting %d of them after %.0f s", short, size, wait_for_cluster_s)
            break
    bundle = {"GPU": 1, "CPU": num_cpus} if on_gpus else {"CPU": num_cpus}
    t0 = time.monotonic()
    # A reservation on free devices is placed in well under PLACE_S; one that is not, waits for
    # devices other work holds.
    first = max(wait_for_cluster_s, PLACE_S) if fewer_ok and size > 1 else timeout_s
    pg = _placed(bundle, size, min(first, timeout_s))
    if pg is None and fewer_ok and size > 1:
        # The cluster is whole but its devices are not all free (a lost node's work still
        # holds a reservation): go on with the hosts that fit in what is free.
        free = ray.available_resources()
        fit = min(int(free.get(k, 0.0) // v) for k, v in bundle.items())
        fewer = max(1, min(fit, size - 1))
        log.warning("%d hosts of %s not placed within %.0f s; starting %d", size, bundle,
                    first, fewer)  # fmt: skip
        asked, size = asked or size, fewer
        pg = _placed(bundle, size, timeout_s)
    if pg is None:
        raise IntrospectError(
            f"n: {size} hosts of {bundle} could not be placed within {timeout_s:.0f} s "
            f"(free: {ray.available_resources()}); lower n or free resources"
        )
    hosts = [
        ModelHost.options(
            num_cpus=num_cpus,
            num_gpus=1 if on_gpus else 0,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
        ).remote(model, adapter, dtype, None, trust_remote_code)
        for i in range(size)
    ]
    pool = HostPool(hosts, pg, wait_s=time.monotonic() - t0, asked=asked)
    try:
        # No retries: a host that cannot load its model will not load it on a second try.
        infos = [h.info.options(max_task_retries=0).remote() for h in hosts]
        pool.infos = ray.get(infos, timeout=timeout_s)
    except ray.exceptions.RayActorError as e:
        pool.close()
        raise _load_error(model, e) from None
    except ray.exceptions.GetTimeoutError:
        pool.close()
        raise IntrospectError(
            f"model: hosts did not load {model!r} within {timeout_s:.0f} s"
        ) from None
    return pool


def _placed(bundle: dict, size: int, timeout_s: float):
    """A PACK placement group of ``size`` bundles once it is placed, or None (and removed) if
    it is not within ``timeout_s``."""
    pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
        return pg
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        return None


def _load_error(model: str, e: Exception) -> IntrospectError:
    """A host's failed model load as one line: its own IntrospectError when it raised one."""
    lines = [line.strip() for line in str(e).splitlines() if "Error:" in line]
    ours = [line for line in lines if line.startswith("introspect.errors.IntrospectError: ")]
    if ours:
        return IntrospectError(ours[-1].split(": ", 1)[1])
    return IntrospectError(f"model: a host could not load {model!r} ({lines[-1] if lines else e})")
