"""One stance training run (SFT or DPO) from one config: what ``introspect stance train`` does.

:class:`StanceRun` is one run's settings, ``kind`` plus the trainer's fields (the comparison's
runs are the same class); :class:`StanceTrainConfig` adds the model and the corpus. Each field
is defined once: the optimiser and weight-choice fields in ``tuning.TuneConfig``, β in
``tuning.DPOSettings``, the model in ``introspect.config.ModelChoice``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from introspect import models
from introspect.config import Config, ModelChoice, parse
from introspect.stance import corpus
from introspect.stance.dpo import DPORunConfig, train_dpo
from introspect.stance.sft import SFTRunConfig, train_sft
from introspect.stance.tuning import DPOSettings, Progress, TuneConfig, check_layers, dpo_defaults


class StanceKind(Config):
    """The kind of a stance run (its own class so that it is validated before β)."""

    kind: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning on answers; dpo: preference optimisation on "
        "chosen/rejected pairs",
    )


class StanceRun(DPOSettings, TuneConfig, StanceKind):  # fields: kind, TuneConfig's, beta
    """One SFT or DPO run: ``kind`` and the trainer's settings. ``beta`` is refused for sft;
    dpo runs default to ``lr`` = ``tuning.DPO_LR``."""

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "dpo":
            return dpo_defaults(data)
        return data

    @field_validator("beta")
    @classmethod
    def _dpo_only(cls, beta: float, info: ValidationInfo) -> float:
        # Runs only for a β that was given (the default is not validated).
        if info.data.get("kind") == "sft":
            raise ValueError("only dpo runs take beta (this run's kind is sft)")
        return beta


def trainer_config(run: StanceRun) -> SFTRunConfig | DPORunConfig:
    """The trainer's own config for ``run`` (what ``train_sft`` / ``train_dpo`` take)."""
    cls = DPORunConfig if run.kind == "dpo" else SFTRunConfig
    return cls.model_validate(run.model_dump(include=set(cls.model_fields)))


class StanceTrainConfig(StanceRun, ModelChoice):
    """``stance train``: fine-tune a model on a stance corpus (SFT rows or preference pairs)."""

    corpus: str | None = Field(
        None,
        description="JSONL of SFT rows (sft) or preference pairs (dpo), or the seed's "
        "training_corpus.json; default: the shipped corpus of that kind",
    )


def run_stance_train(
    config: StanceTrainConfig | dict,
    out_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
) -> dict:
    """Train ``config.model`` on the corpus; ``out_dir`` gets ``artifact/``, ``log.jsonl`` and
    ``result.json``. Returns the metrics (see :func:`summary_line`).

    Raises ``introspect.train.TrainingDiverged`` on a non-finite loss or gradient (nothing is
    saved then); the caller decides what that means (the CLI exits with 3).
    ``progress(step, max_steps)`` is called after each optimizer step."""
    cfg = parse(StanceTrainConfig, config)
    out = Path(out_dir)
    run = trainer_config(cfg)
    check_layers(run, models.dims(cfg.model)[0])  # before any weights are loaded
    path = cfg.corpus or str(corpus.shipped("sft" if cfg.kind == "sft" else "pairs"))
    rows = corpus.read_sft(path) if cfg.kind == "sft" else corpus.read_pairs(path)
    lm = models.load(cfg.model, dtype=cfg.dtype)
    train = train_sft if cfg.kind == "sft" else train_dpo
    result = train(lm, rows, run, out, progress)
    return {
        "kind": cfg.kind,
        "model": cfg.model,
        "corpus": str(path),
        "n_rows": len(rows),
        "config": cfg.model_dump(exclude={"beta"} if cfg.kind == "sft" else None),
        **result.to_dict(),
        "out_dir": str(out),
    }


def summary_line(metrics: dict) -> str:
    """``sft lora: 20 steps in 31 s, 1,234 trainable parameters, loss 2.1 → 1.3, artifact …``"""
    st = metrics["stability"]

    def loss(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (
        f"{metrics['kind']} {metrics['method']}: {metrics['steps']} steps in "
        f"{metrics['train_seconds']:.0f} s, {metrics['trainable_params']:,} trainable parameters, "
        f"loss {loss(st['first'])} → {loss(st['final'])}, artifact "
        f"{metrics['artifact_bytes'] / 2**20:.2f} MiB → {metrics['out_dir']}"
    )
