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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from introspect.config import Config
from introspect.errors import IntrospectError
from introspect.io import write_json, write_jsonl
from introspect.models import LoadedModel, causal_lm, decoder_layers
from introspect.train import TrainingDiverged

Method = Literal["full", "lora", "surgical_lora", "selective"]
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERED = ("surgical_lora", "selective")  # the methods that take ``layers``
DPO_LR = 5e-5  # DPO runs' default learning rate (TuneConfig.lr's default is SFT's)
META = "meta.json"
logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


def _misfit(method: str, field: str, value, layers_defaulted: bool) -> str | None:
    """What is wrong with ``layers`` or ``modules`` (``field``) for ``method``, if anything."""
    if field == "modules":
        if method != "full" and not value:
            return "name at least one linear module (e.g. q_proj)"
    elif method in LAYERED and not value and not (layers_defaulted and value is None):
        return f"method {method!r} needs a list of decoder layers"
    elif method not in LAYERED and value is not None:
        return f"only surgical_lora and selective take layers, not {method!r}"
    return None


class TuneConfig(Config):
    """Which weights train and how. SFT and DPO runs extend it.

    Layer indices are checked against the model only when it is known: :func:`check_layers`."""

    # A subclass whose caller fills in ``layers`` later (the comparison: the middle four) sets
    # this, so surgical_lora / selective may leave ``layers`` unset.
    LAYERS_DEFAULTED: ClassVar[bool] = False

    method: Method = Field(
        "lora",
        description="which weights train: full (every parameter), lora (LoRA on `modules` in "
        "every layer), surgical_lora (LoRA on `modules` in `layers` only), selective (no "
        "adapter: unfreeze `modules` in `layers`)",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        validate_default=True,
        description="decoder layers to touch, e.g. [13, 14] (surgical_lora and selective only)",
    )
    modules: list[str] = Field(
        list(ALL_MODULES),
        description="linear module kinds to adapt or unfreeze, e.g. [q_proj, v_proj] (full: "
        "ignored)",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lr: float = Field(
        2e-4, gt=0, description=f"peak learning rate (DPO runs default to {DPO_LR:g})"
    )
    max_steps: int = Field(20, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples (DPO: pairs) per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="share of the steps spent warming the learning rate up"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    max_length: int = Field(512, ge=1, description="tokens per example (longer ones are cut)")
    seed: int = Field(0, description="seed of the data order and of LoRA's initial weights")

    @field_validator("method", "layers", "modules")
    @classmethod
    def _fit_method(cls, value, info: ValidationInfo):
        """``layers`` and ``modules`` must suit ``method``: checked as each is validated (the
        fields before it are known then) and when ``method`` is assigned later; an error names
        the field at fault."""
        data = {**info.data, info.field_name: value}
        if "method" not in data:  # the method itself was refused
            return value
        for field in [f for f in ("layers", "modules") if f in data]:
            problem = _misfit(data["method"], field, data[field], cls.LAYERS_DEFAULTED)
            if problem:
                raise ValueError(problem if field == info.field_name else f"{field}: {problem}")
        return value

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_ratio * self.max_steps)


class DPOSettings(Config):
    """What a DPO run adds to :class:`TuneConfig` (its one definition, shared by every config
    that can describe a DPO run)."""

    beta: float = Field(
        0.1, gt=0, description="DPO β: larger keeps the policy closer to the reference model"
    )


def dpo_defaults(data: Any) -> Any:
    """A DPO run's raw settings with DPO's default learning rate where none is given."""
    if isinstance(data, dict) and "lr" not in data:
        return {**data, "lr": DPO_LR}
    return data


def check_layers(config: TuneConfig, n_layers: int) -> None:
    """``layers`` against the model's decoder layers (the one check that needs the model)."""
    bad = [i for i in config.layers or [] if i >= n_layers]
    if bad:
        raise IntrospectError(
            f"layers: {bad[0]} is out of range [0, {n_layers}) for a model of {n_layers} "
            "decoder layers"
        )


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
    check_layers(config, lm.n_layers)
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


@cache
def guarded(trainer_class: type) -> type:
    """``trainer_class`` (TRL's SFTTrainer or DPOTrainer) with :class:`GuardMixin`."""
    return type(f"Guarded{trainer_class.__name__}", (GuardMixin, trainer_class), {})


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


def progress_callback(progress: Progress):
    """A callback reporting ``progress(step, max_steps)`` after each optimizer step."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps)

    return ReportProgress()


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

    def stability(self, factor: float = 1.5) -> dict:
        return loss_stability([r["loss"] for r in self.log], factor)

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


def train_with(
    build,
    lm: LoadedModel,
    data,
    config: TuneConfig,
    out_dir: str | os.PathLike,
    kind: str,
    progress: Progress | None = None,
) -> TuneResult:
    """Train ``lm`` (in place) on ``data`` with the trainer ``build(lm, data, config, out_dir)``
    makes; write the artifact, ``log.jsonl`` and ``result.json`` into ``out_dir``. Raises
    ``TrainingDiverged`` on a non-finite loss/gradient. ``progress(step, max_steps)`` is called
    after each optimizer step."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build(lm, data, config, out)
    snapshot = snapshot_trainable(trainer.model, config)
    return run_trainer(trainer, lm, config, out, kind, snapshot, progress)


def run_trainer(
    trainer,
    lm: LoadedModel,
    config: TuneConfig,
    out_dir: Path,
    kind: str,
    snapshot: dict[str, torch.Tensor] | None,
    progress: Progress | None = None,
) -> TuneResult:
    """Train, then save the artifact and ``result.json`` / ``log.jsonl`` into ``out_dir``
    (``progress`` as in :func:`train_with`)."""
    from transformers import PrinterCallback

    model = trainer.model
    trainable, total = parameter_counts(model)
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; log.jsonl has them
    trainer.add_callback(gradient_guard())
    if progress is not None:
        trainer.add_callback(progress_callback(progress))
    run = f"{kind} {config.method}"
    logger.info("%s: %d optimizer steps, %d trainable parameters", run, config.max_steps, trainable)
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
    logger.info("%s: trained in %.0f s (%.0f CPU s), artifact %d bytes", run, seconds, cpu, size)
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
    write_jsonl(out_dir / "log.jsonl", log)
    write_json(
        out_dir / "result.json", {"kind": kind, "config": config.model_dump(), **result.to_dict()}
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

    meta = {"kind": kind, "method": config.method, "base_model": lm.name}
    meta |= config.model_dump(include={"layers", "modules"})
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
