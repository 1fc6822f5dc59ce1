"""``introspect check``: will every stage of a plan fit, and roughly how long and how much?

Nothing is loaded: each stage's model is counted on the meta device from its config
(:mod:`introspect.memory`), each stage's work is counted from its recipe config (examples x
tokens for trainings, trials x tokens for evaluations, tokens generated for the generating
suites), and the runner's own admission rule (:mod:`pipelines.placement`) is replayed over the
estimated durations to give the plan's wall time under its concurrency.

Time is FLOPs at a stated MFU of a stated peak (GPU: ``--gpu-tflops``, default the A100's bf16
312; CPU: a matmul timed here), generation one weight read per step at a stated memory
bandwidth, plus stated fixed costs (model load, Ray Train start). These are estimates: the
report of a finished plan holds the measured times beside them.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field, replace

from introspect.errors import IntrospectError
from introspect.evals.localization import QUESTIONS
from introspect.memory import (
    GIB,
    TrainShape,
    arch,
    eval_memory,
    forward_flops,
    on_gpu,
    train_flops,
    train_memory,
)
from pipelines.placement import add, check_feasible, fits, loads_model, unit_need
from pipelines.plan import Plan, stage_configs

# Fixed costs, seconds (measured on this project's runs; stated in the output).
TASK_START_S = 3.0  # a Ray task's process and imports
TRAIN_START_S = 25.0  # a Ray Train job: controller, worker group, data materialised
LOAD_GBPS = 1.5  # reading weights from local disk into the device
CPU_MFU = 0.8  # of the timed matmul rate, for a small model's forward and backward
DECODE_OVERHEAD_S = {"cpu": 0.02, "gpu": 0.03}  # per generated token step (Python + kernels)


@dataclass
class Device:
    """What the plan runs on: ``gpus`` x ``gpu_memory_gb``, ``cpus`` CPUs."""

    gpus: int
    gpu_memory_gb: float
    cpus: int
    mfu: float = 0.35
    gpu_tflops: float = 312.0
    hbm_gbps: float = 2000.0

    @functools.cached_property
    def cpu_flops(self) -> float:
        """fp32 matmul FLOP/s of this machine's torch, timed once (~0.3 s)."""
        import torch

        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.3:
            a @ b
            n += 1
        return 2 * 512**3 * n / (time.perf_counter() - t0)

    cpus_per_unit: float = 1.0  # the plan's cpus_per_worker: torch's threads in each unit

    def flops(self, gpu: bool) -> float:
        """Useful FLOP/s of one unit: one GPU, or its share of this machine's cores."""
        if gpu:
            return self.gpu_tflops * 1e12 * self.mfu
        share = min(1.0, self.cpus_per_unit / (os.cpu_count() or 1))
        return self.cpu_flops * share * CPU_MFU


@dataclass
class StageEstimate:
    name: str
    devices: str
    seconds: float
    device_hours: float
    peak_gib: float | None = None  # per device
    parts: dict[str, float] = field(default_factory=dict)  # GiB by part
    note: str = ""


# --------------------------------------------------------------------------- token lengths


@functools.cache
def _lengths() -> tuple[int, int]:
    """Prefix and suffix tokens of a typical detection trial (SmolLM2's tokenizer, whose
    English token counts are within a few percent of Qwen's): the longest of 64 drawn rows."""
    from introspect.data import default_prompts
    from introspect.detection import DetectionExample, build_prompt
    from introspect.models import smollm2_tokenizer

    tok, texts = smollm2_tokenizer(), default_prompts()
    prompts = [
        build_prompt(tok, DetectionExample(c, texts["assistant_responses"][0], q))
        for c in texts["context_prompts"][:8]
        for q in texts["detection_questions"][:8]
    ]
    return max(len(p.prefix_ids) for p in prompts), max(len(p.suffix_ids) for p in prompts)


# --------------------------------------------------------------------------- per stage


def _load_s(model: str, dtype_bytes: int) -> float:
    return arch(model).n_params * dtype_bytes / (LOAD_GBPS * 1e9) + 2.0


def _dtype_bytes(dtype: str | None, gpu: bool) -> int:
    """Bytes per weight: the stage's dtype, else the default where it runs (fp16 included)."""
    from introspect.precision import resolve

    return resolve(dtype, "cuda" if gpu else "cpu").itemsize


def _train_estimate(plan: Plan, name: str, recipe_config, dev: Device) -> StageEstimate:
    from introspect.train import total_steps
    from pipelines.recipes.train import overrides_config

    stage, gpu = plan.stages[name], plan.resources.use_gpu
    data = plan.stages[stage.data]
    config = recipe_config
    if stage.kind == "sweep":  # each trial: the preset with the sweep's overrides
        config = overrides_config(stage.preset, stage.overrides, f"stages.{name}.overrides")
    a = arch(recipe_config.model)
    w = _dtype_bytes(recipe_config.dtype, gpu)
    tp, ts = _lengths()
    shape = TrainShape(
        batch=config.batch_size // stage.num_workers,
        prefix=tp,
        suffix=ts,
        dtype_bytes=w,
        method=config.method,
        lora_r=config.lora_r,
        targets=tuple(config.target_modules),
        checkpointing=config.gradient_checkpointing,
    )
    n_train = round(data.n * (1 - data.val_fraction))
    steps = total_steps(config, n_train)
    trials = 1
    if stage.kind == "sweep":
        trials = len(stage.lora_r) * len(stage.lr) if stage.search == "grid" else stage.num_samples
    examples = steps * config.batch_size * config.grad_accum
    evals = steps // config.eval_every + 1
    flops = examples * train_flops(a, shape)
    flops += evals * min(config.val_max_examples, data.n - n_train) * forward_flops(a, tp + ts)
    workers = stage.num_workers
    seconds = flops / workers / dev.flops(gpu) + TRAIN_START_S + _load_s(recipe_config.model, w)
    parts = train_memory(a, shape)
    other = train_memory(a, replace(shape, checkpointing=not shape.checkpointing))
    saved = abs(other["activations"] - parts["activations"]) / GIB
    ckpt = f"; checkpointing {'saves' if shape.checkpointing else 'would save'} {saved:.2f} GiB"
    need = unit_need(plan, name, _total(dev))
    at_once = max(1, int(need["GPU"] if gpu else need["CPU"] / plan.resources.cpus_per_worker))
    at_once = max(1, at_once // workers)
    seconds *= math.ceil(trials / at_once)
    held = need["GPU"] if gpu else need["CPU"]
    return StageEstimate(
        name, _devices(need, gpu), seconds, held * seconds / 3600,
        on_gpu(parts) / GIB if gpu else sum(parts.values()) / GIB,
        {k: v / GIB for k, v in parts.items()},
        (f"{trials} trial(s) x {steps} steps x {config.batch_size}" if trials > 1
         else f"{steps} steps x batch {config.batch_size}") + ckpt,
    )  # fmt: skip


@functools.cache
def _localization_lengths(n_sentences: int) -> tuple[int, int]:
    """Prefix and suffix tokens of a B7 / Phase C trial: the longest of a few messages of
    ``n_sentences``, asked the sentence question (the longest), in SmolLM2's tokenizer."""
    import torch

    from introspect.evals.localization import localization_prompts, localization_trials
    from introspect.models import smollm2_tokenizer

    trials = localization_trials(30, [1.0] * 30, range(1), 8, "eval", ["sentence"],
                                 n_sentences=n_sentences)  # fmt: skip
    prompts = localization_prompts(smollm2_tokenizer(), trials, torch.zeros(1, 8))
    return max(len(p.prefix_ids) for p in prompts), max(len(p.suffix_ids) for p in prompts)


# Per suite: (rows forwarded, tokens each), (rows generated, new tokens each) from its config.
def _suite_work(suite: str, cfg) -> tuple[int, int, int, int]:
    tp, ts = _lengths()
    if suite == "detection":
        tiers = 3 if cfg.concepts else 2
        return 2 * cfg.n_per_tier * (tiers + (1 if cfg.food else 0)), tp + ts, 0, 0
    if suite == "behavioral":
        from introspect.evals.behavioral import behavioral_trials

        return len(behavioral_trials()), 60, 0, 0
    if suite == "identity":
        from introspect.evals.identity import identity_trials

        return 0, 0, len(identity_trials(None, cfg.n_samples, cfg.n_questions)), cfg.max_new_tokens
    if suite == "self-prediction":
        n = cfg.n_per_task * 25
        return 0, 0, 2 * n, 16
    if suite == "calibration":
        n = cfg.n_prompts or 12
        return 0, 0, n * (cfg.n_samples + 1), max(cfg.answer_tokens, cfg.report_tokens // 4)
    if suite in ("concepts", "susceptibility"):
        n = cfg.n_concepts * len(cfg.magnitudes) * cfg.n_samples * 2
        if suite == "susceptibility":  # + the KL: each steered row and its twin read once more
            return n, tp + ts, n, cfg.max_new_tokens
        return 0, 0, n, cfg.max_new_tokens
    if suite == "localization":
        n = len(cfg.questions or QUESTIONS) * cfg.n_per_question
        return n, sum(_localization_lengths(cfg.n_sentences)), 0, 0
    if suite == "yes-bias":
        from introspect.evals.behavioral import behavioral_trials
        from introspect.evals.common import read_json, read_resource

        qs = read_json(cfg.questions, "questions") if cfg.questions else None
        n = len(behavioral_trials(qs or read_resource("yes_bias.json")))
        return 2 * n * cfg.n_per_question, tp + ts, 0, 0
    if suite == "input-control":
        return (2 + len(cfg.perturbations)) * cfg.n_trials, tp + ts, 0, 0
    if suite == "side-effects":
        from introspect.evals.behavioral import behavioral_trials
        from introspect.evals.common import read_json
        from introspect.evals.side_effects import capability_trials

        qs = read_json(cfg.questions, "questions") if cfg.questions else None
        return len(behavioral_trials()), 60, len(capability_trials(qs)), cfg.max_new_tokens
    raise IntrospectError(f"check: no workload model for suite {suite!r}")


def _eval_seconds(model: str, work, batch: int, w: int, gpu: bool, dev: Device) -> float:
    a = arch(model)
    rows, tokens, gen_rows, new = work
    seconds = rows * forward_flops(a, tokens) / dev.flops(gpu)
    if gen_rows:
        steps = math.ceil(gen_rows / batch) * new
        per_step = DECODE_OVERHEAD_S["gpu" if gpu else "cpu"]
        if gpu:
            per_step += a.n_params * w / (dev.hbm_gbps * 1e9 * 0.6)
        else:
            per_step += batch * forward_flops(a, 1, 200) / dev.flops(False)
        seconds += steps * per_step + gen_rows * forward_flops(a, 60) / dev.flops(gpu)
    return seconds


def _eval_estimate(plan: Plan, name: str, configs, dev: Device) -> StageEstimate:
    stage, gpu = plan.stages[name], plan.resources.use_gpu
    first = configs[0][2]
    w = _dtype_bytes(first.dtype, gpu)
    batch = getattr(first, "batch_size", 16)
    per_model = [
        _eval_seconds(cfg.model, _suite_work(stage.suite, cfg), batch, w, gpu, dev)
        for _, _, cfg in configs
    ]
    hosts = max(1, stage.hosts)
    load = _load_s(first.model, w) + TASK_START_S
    seconds = (load + sum(per_model) / hosts) if stage.hosts else load + max(per_model)
    units = 1 if stage.hosts else len(configs)
    a = arch(first.model)
    tp, ts = _lengths()
    parts = eval_memory(a, batch, tp + ts + 64, w)
    need = unit_need(plan, name, _total(dev))
    held = (need["GPU"] if gpu else need["CPU"]) * units
    hours = held * seconds / 3600 if stage.hosts else sum(
        (need["GPU"] if gpu else need["CPU"]) * (load + s) / 3600 for s in per_model
    )
    return StageEstimate(
        name, _devices(need, gpu), seconds, hours,
        on_gpu(parts) / GIB if gpu else sum(parts.values()) / GIB,
        {k: v / GIB for k, v in parts.items()},
        f"{len(configs)} model(s)" + (f" on {hosts} hosts" if stage.hosts else ""),
    )  # fmt: skip


def _small_estimate(plan: Plan, name: str, config, dev: Device) -> StageEstimate:
    """Vectors, norms and data stages: a model load and a few forward passes at most."""
    stage, gpu = plan.stages[name], plan.resources.use_gpu
    need = unit_need(plan, name, _total(dev))
    seconds = TASK_START_S
    peak = None
    if loads_model(stage):
        w = _dtype_bytes(getattr(config, "dtype", None), gpu)
        a = arch(config.model)
        rows = getattr(config, "n", 20) * 8 if stage.kind == "vectors" else 40
        seconds += _load_s(config.model, w) + rows * forward_flops(a, 40) / dev.flops(gpu)
        peak = (a.n_params * w) / GIB
    if stage.kind == "data":
        seconds += config.n / 2000  # drawing rows
    held = need["GPU"] if gpu and need["GPU"] else need["CPU"]
    return StageEstimate(name, _devices(need, gpu), seconds, held * seconds / 3600, peak)


def _localize_estimate(plan: Plan, name: str, config, dev: Device) -> StageEstimate:
    from introspect.train import total_steps

    gpu = plan.resources.use_gpu
    train = config.train_config()
    a = arch(config.model)
    w = _dtype_bytes(config.dtype, gpu)
    tp, ts = _localization_lengths(config.n_sentences)
    shape = TrainShape(train.batch_size, tp, ts, w, train.method, train.lora_r,
                       tuple(train.target_modules), train.gradient_checkpointing)  # fmt: skip
    steps = total_steps(train, config.n_train)
    flops = steps * train.batch_size * train_flops(a, shape)
    evals = len(config.questions or QUESTIONS) * config.n_per_question * (1 + config.eval_base)
    flops += evals * forward_flops(a, tp + ts)
    seconds = flops / dev.flops(gpu) + _load_s(config.model, w) + TASK_START_S
    parts = train_memory(a, shape)
    need = unit_need(plan, name, _total(dev))
    held = need["GPU"] if gpu else need["CPU"]
    return StageEstimate(
        name, _devices(need, gpu), seconds, held * seconds / 3600,
        on_gpu(parts) / GIB if gpu else sum(parts.values()) / GIB,
        {k: v / GIB for k, v in parts.items()}, f"{steps} steps x batch {train.batch_size}",
    )  # fmt: skip


def _devices(need: dict, gpu: bool) -> str:
    if gpu and need.get("GPU"):
        return f"{need['GPU']:g} GPU"
    return f"{need['CPU']:g} CPU"


def _total(dev: Device) -> dict[str, float]:
    return {"CPU": float(dev.cpus), "GPU": float(dev.gpus)}


def estimate_stage(plan: Plan, name: str, dev: Device) -> StageEstimate:
    """One stage's devices, memory, time and device-hours."""
    kind = plan.stages[name].kind
    configs = stage_configs(plan, name, None)
    if kind in ("train", "sweep"):
        return _train_estimate(plan, name, configs[0][2], dev)
    if kind == "eval":
        return _eval_estimate(plan, name, configs, dev)
    if kind == "localize":
        return _localize_estimate(plan, name, configs[0][2], dev)
    if kind == "stance":
        need = unit_need(plan, name, _total(dev))
        return StageEstimate(name, _devices(need, plan.resources.use_gpu), 600.0, 600 / 3600,
                             note="stance: a flat 10 min (not modelled)")  # fmt: skip
    return _small_estimate(plan, name, configs[0][2], dev)


# --------------------------------------------------------------------------- the plan


@dataclass
class PlanEstimate:
    stages: list[StageEstimate]
    wall_s: float
    device_hours: float
    usd: float
    device: Device
    gpu: bool


def _fit(plan: Plan, e: StageEstimate, dev: Device) -> None:
    """Refuse a stage whose per-device peak exceeds the GPU, naming the fix."""
    if not plan.resources.use_gpu or e.peak_gib is None or e.peak_gib <= dev.gpu_memory_gb:
        return
    stage = plan.stages[e.name]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in e.parts.items())
    if stage.kind in ("train", "sweep", "localize"):
        weights = e.parts.get("weights", 0.0)
        if weights >= dev.gpu_memory_gb:
            fix = "the weights alone do not fit: a larger GPU, or method: full with ZeRO-3 offload"
        elif not e.parts or e.parts.get("activations", 0) < 1:
            fix = "fewer concurrent stages or offload"
        else:
            fix = "a smaller batch_size, or gradient_checkpointing: true, or offload"
    else:
        fix = "a smaller options.batch_size, or a larger GPU"
    raise IntrospectError(
        f"stages.{e.name}: needs ~{e.peak_gib:.1f} GiB per GPU ({parts} GiB, plus CUDA context "
        f"and allocator slack), the GPUs have {dev.gpu_memory_gb:g}; {fix}"
    )


def check_plan(plan: Plan, dev: Device) -> PlanEstimate:
    """Every stage's estimate; refuses (one line) what cannot fit or be scheduled."""
    from pipelines.runner import units

    gpu = plan.resources.use_gpu
    if gpu and dev.gpus < 1:
        raise IntrospectError("resources.use_gpu: the plan runs on GPUs; pass --gpus N")
    dev.cpus_per_unit = plan.resources.cpus_per_worker
    total = _total(dev)
    check_feasible(plan, list(plan.stages), total)
    estimates = {n: estimate_stage(plan, n, dev) for n in plan.stages}
    trainings = ("train", "sweep", "localize")  # the largest peaks: named first
    for e in sorted(estimates.values(), key=lambda e: plan.stages[e.name].kind not in trainings):
        _fit(plan, e, dev)
    wall = _schedule(plan, units(plan), estimates, total)
    hours = sum(e.device_hours for e in estimates.values())
    rate = plan.cost.usd_per_gpu_hour if gpu else plan.cost.usd_per_cpu_hour
    return PlanEstimate(list(estimates.values()), wall, hours, hours * rate, dev, gpu)


def _schedule(plan: Plan, todo: list, estimates: dict, total: dict) -> float:
    """The runner's admission replayed over the estimated durations: the plan's wall time."""
    done_at: dict[str, float] = {}
    running: list[tuple[float, str, dict]] = []  # (ends, stage, need)
    started: set[str] = set()
    now, used = 0.0, {}
    stages = list(dict.fromkeys(u.stage for u in todo))
    needs = {s: {n for u in todo if u.stage == s for n in u.needs} for s in stages}
    while len(done_at) < len(stages):
        for s in stages:
            if s in started or not all(n in done_at for n in needs[s]):
                continue
            need = unit_need(plan, s, total)
            if fits(need, used, total):
                started.add(s)
                used = add(used, need)
                running.append((now + estimates[s].seconds, s, need))
        if not running:
            raise IntrospectError("check: the plan cannot be scheduled (a bug in check)")
        running.sort()
        now, s, need = running.pop(0)
        used = add(used, need, -1.0)
        done_at[s] = now
    return now


def format_estimate(p: PlanEstimate, plan: Plan) -> str:
    """The table ``introspect check`` prints."""
    from introspect.io import markdown_table

    rows = []
    for e in p.stages:
        rows.append({
            "stage": e.name,
            "kind": plan.stages[e.name].kind,
            "devices": e.devices,
            "peak GiB/device": "" if e.peak_gib is None else f"{e.peak_gib:.1f}",
            "memory (GiB)": ", ".join(f"{k} {v:.2f}" for k, v in e.parts.items() if v >= 0.005),
            "time": _hms(e.seconds),
            "device-h": f"{e.device_hours:.2f}",
            "work": e.note,
        })  # fmt: skip
    dev = p.device
    where = (
        f"{dev.gpus} GPU x {dev.gpu_memory_gb:g} GB, {dev.cpus} CPUs; {dev.gpu_tflops:g} TFLOP/s "
        f"at MFU {dev.mfu:g}"
        if p.gpu
        else f"{dev.cpus} CPUs; matmul {dev.cpu_flops / 1e9:.0f} GFLOP/s timed here, at {CPU_MFU:g}"
    )
    unit = "GPU" if p.gpu else "CPU"
    rate = plan.cost.usd_per_gpu_hour if p.gpu else plan.cost.usd_per_cpu_hour
    box = p.wall_s / 3600 * (dev.gpus if p.gpu else dev.cpus) * rate
    return (
        f"{plan.name}: {where}\n\n{markdown_table(rows, list(rows[0]))}\n\n"
        f"total: {_hms(p.wall_s)} wall under the plan's concurrency, "
        f"{p.device_hours:.2f} {unit}-hours, ${p.usd:.2f} at the plan's rate "
        f"(${box:.2f} for the whole box over the wall time)\n"
        f"(estimates from FLOPs; fixed costs: Ray Train start {TRAIN_START_S:g} s, model load at "
        f"{LOAD_GBPS:g} GB/s)\n"
    )


def _hms(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"
