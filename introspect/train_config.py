"""The typed config of a detection-training run (:class:`TrainConfig`) and its presets.

Apart from the loop in :mod:`introspect.train` so that reading, checking or sending a config
(plans, Ray Train's controller, Tune) costs no torch import.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from introspect.config import Config, parse
from introspect.errors import IntrospectError


class TrainConfig(Config):
    """Every knob of a detection-training run. Presets fill some; any field can be overridden."""

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapter or full fine-tuning")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="modules LoRA wraps"
    )
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: float = Field(
        2.0, gt=0, description="passes over the training data (ignored when max_steps is set)"
    )
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    eval_every: int = Field(50, ge=1, description="validate every N steps")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps")
    val_max_examples: int = Field(256, ge=1, description="validation examples used")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    seed: int = Field(0, description="data order and initialisation seed")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    data_variant: str = Field(
        "original", description="the data variant this run expects (plans check it)"
    )
    info_prompt: bool = Field(False, description="prepend the info prompt to every example")
    mass_weight: float = Field(
        0.0,
        ge=0,
        description="weight of -log(probability mass of the answer pair) added to the 2-way "
        "loss; 1 makes it the full-vocabulary cross-entropy on the answer token. 0 (the "
        "reference's loss) leaves the pair's mass where the base model has it, which suits "
        "yes/no; a neutral pair such as Red/Blue needs it, or its answers stay under the mass "
        "filter",
    )
    contexts_per_batch: int | None = Field(
        None,
        ge=1,
        description="build each micro-batch from this many prefixes (context + reply), "
        "batch_size / contexts_per_batch steerings each, and run each prefix once below the "
        "layers its steerings start at (default: uniform batches, no sharing)",
    )

    prefix_grad: bool = Field(
        False,
        description="backpropagate through the steered prefix pass too, so the adapter can "
        "learn how steered tokens are encoded, not only how the question reads them (needed to "
        "localise one steered sentence among ten; about twice the step time; no prefix sharing)",
    )

    @model_validator(mode="after")
    def _contexts_divide_the_batch(self) -> TrainConfig:
        if self.contexts_per_batch and self.batch_size % self.contexts_per_batch:
            raise ValueError(
                f"contexts_per_batch: {self.contexts_per_batch} must divide batch_size "
                f"{self.batch_size}"
            )
        return self


PRESETS: dict[str, dict] = {
    # Seed 002's five runs. Hyperparameters follow the reference (LoRA r16/α32 on q,k,v,o,
    # AdamW 2e-4, 100 warm-up steps); batch 8 in one pass instead of batch 1 × accumulation 8.
    "original": {},
    "vague-prompt": {"data_variant": "vague-prompt"},
    "r1-minimal": {"lora_r": 1, "lora_alpha": 2},
    "food-control": {"data_variant": "food-control"},
    "flipped-labels": {"data_variant": "flipped-labels"},
}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset's config with overrides; unknown presets and fields are named in the error."""
    if name not in PRESETS:
        raise IntrospectError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return parse(TrainConfig, {**PRESETS[name], **overrides})
