"""What SFT and DPO share: which weights train, TRL arguments, the divergence guard, artifacts.

Four ways to choose the trainable weights (``method``):

* ``full``: every parameter (embeddings included).
* ``lora``: LoRA on ``modules`` in every decoder layer ("distributed" LoRA).
* ``surgical_lora``: LoRA on ``modules`` in the chosen ``layers`` only (peft's
  ``layers_to_transform``).
* ``selective``: no adapter; the weights of ``modules`` in the chosen ``layers`` are unfrozen and
  everything else is frozen.

After training, :func:`save_artifact` writes what a user would keep: the adapter (LoRA), the whole
model (full), or a layer checkpoint holding the changed modules' ΔW (selective; see
``layer_checkpoints.py``). ``meta.json`` in it names the method and base model, so
:func:`load_tuned` can rebuild the tuned model from the artifact and the base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from introspect.errors import IntrospectError
from introspect.models import LoadedModel, causal_lm, decoder_layers
from introspect.train import TrainingDiverged

METHODS = ("full", "lora", "surgical_lora", "selective")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META = "meta.json"
logger = logging.getLogger(__name__)


@dataclass
class TuneConfig:
    """Which weights train and how. SFT and DPO runs extend it."""

    method: str = "lora"
    layers: list[int] | None = None  # surgical_lora / selective: the decoder layers to touch
    modules: list[str] = field(default_factory=lambda: list(ALL_MODULES))
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lr: float = 2e-4
    max_steps: int = 20
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0

    def validate(self, n_layers: int | None = None) -> None:
        if self.method not in METHODS:
            raise IntrospectError(f"method: {self.method!r} must be one of {', '.join(METHODS)}")
        needs_layers = self.method in ("surgical_lora", "selective")
        if needs_layers and not self.layers:
            raise IntrospectError(f"layers: method {self.method!r} needs a list of decoder layers")
        if not needs_layers and self.layers is not None:
            raise IntrospectError(
                f"layers: only surgical_lora and selective take layers, not {self.method!r}"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if i < 0 or (n_layers is not None and i >= n_layers)]
            if bad:
                raise IntrospectError(f"layers: {bad[0]} is out of range [0, {n_layers})")
        if self.method != "full" and not self.modules:
            raise IntrospectError("modules: name at least one linear module (e.g. q_proj)")
        for name in ("lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise IntrospectError(f"{name}: {getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise IntrospectError(f"lr: {self.lr} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise IntrospectError(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise IntrospectError(f"lora_dropout: {self.lora_dropout} must be in [0, 1)")
        if not self.max_grad_norm > 0:
            raise IntrospectError(f"max_grad_norm: {self.max_grad_norm} must be > 0")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_ratio * self.max_steps)


# --------------------------------------------------------------------------- trainable weights


def lora_config(config: TuneConfig):
    """peft LoraConfig for ``lora`` (every layer) or ``surgical_lora`` (``config.layers``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.modules),
        layers_to_transform=list(config.layers) if config.layers else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare(lm: LoadedModel, config: TuneConfig, wrap_lora: bool = True) -> nn.Module:
    """Make ``lm.model`` trainable the way ``config.method`` says (in place); returns it.

    With ``wrap_lora=False`` a LoRA method leaves the model unwrapped, for a trainer that is
    given :func:`lora_config` and wraps it itself.
    """
    config.validate(lm.n_layers)
    model = lm.model
    if config.method != "full":  # every named module kind must exist in the chosen layers
        selected_modules(model, config.layers or list(range(lm.n_layers)), config.modules)
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
    if config.method in ("lora", "surgical_lora"):
        if wrap_lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(config))
    elif config.method == "full":
        model.requires_grad_(True)
    else:  # selective
        model.requires_grad_(False)
        chosen = selected_modules(model, config.layers or [], config.modules)
        for module in chosen.values():
            module.weight.requires_grad_(True)
    lm.model = model
    model.train()
    return model


def selected_modules(model: nn.Module, layers: list[int], kinds: list[str]) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of the ``kinds`` (q_proj, ...) inside the given decoder layers, named as
    in the base model (``model.layers.3.self_attn.q_proj``)."""
    stack = decoder_layers(model)
    names = {id(m): n for n, m in causal_lm(model).named_modules()}
    out: dict[str, nn.Linear] = {}
    for i in layers:
        for sub, module in stack[i].named_modules():
            if isinstance(module, nn.Linear) and sub.rsplit(".", 1)[-1] in kinds:
                out[f"{names[id(stack[i])]}.{sub}"] = module
    missing = [k for k in kinds if not any(n.endswith("." + k) for n in out)]
    if missing:
        raise IntrospectError(f"modules: no linear module {missing[0]!r} in the chosen layers")
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters; tied weights count once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- TRL glue


def trl_args(config_cls, config: TuneConfig, out_dir: Path, **extra):
    """TRL config for a local, offline run: no hub, no trackers, no checkpoints, log every step.

    fp32 on CPU (TRL defaults to bf16); bf16 autocast on a GPU that supports it.
    """
    cuda = torch.cuda.is_available()
    return config_cls(
        output_dir=str(out_dir / "trainer"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_length=config.max_length,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        push_to_hub=False,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        **extra,
    )


class GuardMixin:
    """Stops a TRL trainer on a non-finite loss (checked after each micro-batch's backward)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise TrainingDiverged(
                f"step {self.state.global_step + 1}: non-finite loss ({float(loss)}); "
                "training stopped before the optimizer step, nothing was saved"
            )
        return loss


def gradient_guard():
    """A callback that stops on a non-finite gradient, before the optimizer applies it."""
    from transformers import TrainerCallback

    class GradientGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise TrainingDiverged(
                        f"step {state.global_step + 1}: non-finite gradient in {name}; "
                        "training stopped before the optimizer step, nothing was saved"
                    )

    return GradientGuard()


# --------------------------------------------------------------------------- results


@dataclass
class TuneResult:
    """What one run did and cost. ``log`` holds one record per optimizer step."""

    method: str
    steps: int
    trainable_params: int
    total_params: int
    train_seconds: float
    train_cpu_seconds: float
    log: list[dict]
    artifact_dir: str
    artifact_bytes: int

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.log]

    def stability(self, factor: float = 1.5) -> dict:
        return loss_stability(self.losses, factor)

    def to_dict(self) -> dict:
        return {**asdict(self), "stability": self.stability()}


def loss_stability(losses: list[float], factor: float = 1.5, window: int = 5) -> dict:
    """First/final/min/max loss and spikes: steps whose loss exceeds ``factor`` × the median of
    the (up to) ``window`` steps before it (needs 3 earlier steps). Steps count from 1."""
    if not losses:
        return {"first": None, "final": None, "min": None, "max": None, "spikes": []}
    spikes = []
    for i in range(3, len(losses)):
        ref = statistics.median(losses[max(0, i - window) : i])
        if ref > 0 and losses[i] > factor * ref:
            spikes.append(i + 1)
    tail = losses[-3:]
    return {
        "first": losses[0],
        "final": sum(tail) / len(tail),  # mean of the last 3 steps: one step is noisy
        "min": min(losses),
        "max": max(losses),
        "spikes": spikes,
    }


def step_log(history: list[dict]) -> list[dict]:
    """The per-step records of a Trainer's ``state.log_history`` (drops the final summary)."""
    keep = ("loss", "grad_norm", "learning_rate")
    out = []
    for rec in history:
        if "loss" not in rec or "step" not in rec:
            continue
        row = {"step": int(rec["step"])} | {k: float(rec[k]) for k in keep if k in rec}
        row |= {k: float(v) for k, v in rec.items() if k.startswith("rewards/")}
        out.append(row)
    return out


def run_trainer(
    trainer,
    lm: LoadedModel,
    config: TuneConfig,
    out_dir: Path,
    kind: str,
    snapshot: dict[str, torch.Tensor] | None,
) -> TuneResult:
    """Train, then save the artifact and ``result.json`` / ``log.jsonl`` into ``out_dir``."""
    from transformers import PrinterCallback

    model = trainer.model
    trainable, total = parameter_counts(model)
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; log.jsonl has them
    trainer.add_callback(gradient_guard())
    logger.info(
        "%s %s: %d optimizer steps, %d trainable parameters",
        kind,
        config.method,
        config.max_steps,
        trainable,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    # CPU time of all threads: comparable between runs on a shared machine, wall time is not.
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    lm.model = model
    log = step_log(trainer.state.log_history)
    art = out_dir / "artifact"
    size = save_artifact(lm, config, art, kind, snapshot)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # TRL's empty output_dir
    logger.info(
        "%s %s: trained in %.0f s (%.0f CPU s), artifact %d bytes",
        kind,
        config.method,
        seconds,
        cpu,
        size,
    )
    result = TuneResult(
        method=config.method,
        steps=trainer.state.global_step,
        trainable_params=trainable,
        total_params=total,
        train_seconds=seconds,
        train_cpu_seconds=cpu,
        log=log,
        artifact_dir=str(art),
        artifact_bytes=size,
    )
    _write(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    _write(
        out_dir / "result.json",
        json.dumps({"kind": kind, "config": asdict(config), **result.to_dict()}, indent=2),
    )
    return result


def snapshot_trainable(model: nn.Module, config: TuneConfig) -> dict[str, torch.Tensor] | None:
    """Selective runs: a copy of the unfrozen weights before training (to save ΔW after)."""
    if config.method != "selective":
        return None
    chosen = selected_modules(model, config.layers or [], config.modules)
    return {name: m.weight.detach().clone() for name, m in chosen.items()}


# --------------------------------------------------------------------------- artifacts


def save_artifact(
    lm: LoadedModel,
    config: TuneConfig,
    path: Path,
    kind: str,
    snapshot: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write the run's artifact to ``path`` (replacing it); returns its size in bytes."""
    import pandas as pd

    from introspect.stance.layer_checkpoints import save_layer_checkpoint

    meta = {
        "kind": kind,
        "method": config.method,
        "base_model": lm.name,
        "layers": config.layers,
        "modules": config.modules,
    }
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.method == "selective":
        if snapshot is None:
            raise IntrospectError(
                "snapshot: a selective run needs the weights from before training"
            )
        chosen = selected_modules(lm.model, config.layers or [], config.modules)
        deltas = {n: (m.weight.detach() - snapshot[n]).float() for n, m in chosen.items()}
        relative = [float(d.norm() / snapshot[n].float().norm()) for n, d in deltas.items()]
        stats = pd.DataFrame({"module": list(deltas), "relative": relative})
        save_layer_checkpoint(deltas, stats, None, tmp, base_model=lm.name)
    else:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        if config.method == "full":
            lm.tokenizer.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_tuned(
    artifact: str | os.PathLike, base: str | None = None, device: str | None = None
) -> LoadedModel:
    """The tuned model an artifact describes, built on its base model (``base`` overrides the
    name recorded in ``meta.json``). A run directory holding ``artifact/`` is accepted too."""
    from introspect import models
    from introspect.stance.layer_checkpoints import apply_layer_checkpoints

    path = Path(artifact)
    if (path / "artifact" / META).is_file():
        path = path / "artifact"
    if not (path / META).is_file():
        raise IntrospectError(f"artifact: {path} has no {META} (not a stance training artifact)")
    meta = json.loads((path / META).read_text())
    base = base or meta["base_model"]
    if meta["method"] == "full":
        lm = models.load(str(path), device=device)
        lm.name = base
        return lm
    if meta["method"] == "selective":
        lm = models.load(base, device=device)
        apply_layer_checkpoints(lm.model, [(path, 1.0)])
        return lm
    return models.load(base, device=device, adapter=path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
