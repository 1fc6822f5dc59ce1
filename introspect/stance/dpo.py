"""Direct preference optimisation on stance pairs with TRL's DPOTrainer.

Pairs become conversational prompt/chosen/rejected (``corpus.pair_messages``): TRL applies the
chat template and scores only the answer tokens. The loss is the sigmoid DPO loss

    −log σ(β [(log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))])

with log π summed over the answer tokens. The reference π_ref is the base model with the adapter
disabled for the LoRA methods, and a frozen copy of the starting model for full / selective.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from introspect.errors import IntrospectError
from introspect.models import LoadedModel
from introspect.stance.corpus import PreferencePair, pair_messages
from introspect.stance.tuning import (
    GuardMixin,
    TuneConfig,
    TuneResult,
    lora_config,
    prepare,
    run_trainer,
    snapshot_trainable,
    trl_args,
)


@dataclass
class DPORunConfig(TuneConfig):
    """DPO run: :class:`TuneConfig` plus β (larger keeps the policy closer to the reference)."""

    beta: float = 0.1
    lr: float = 5e-5

    def validate(self, n_layers: int | None = None) -> None:
        super().validate(n_layers)
        if not self.beta > 0:
            raise IntrospectError(f"beta: {self.beta} must be > 0")


class GuardedDPOTrainer(GuardMixin, DPOTrainer):
    """DPOTrainer that stops on a non-finite loss."""


def build_dpo_trainer(
    lm: LoadedModel,
    pairs: Sequence[PreferencePair],
    config: DPORunConfig,
    out_dir: str | os.PathLike,
) -> GuardedDPOTrainer:
    """Prepare ``lm.model`` for ``config.method`` (in place) and wrap it in a trainer."""
    if not pairs:
        raise IntrospectError("pairs: the preference corpus is empty")
    config.validate(lm.n_layers)
    # The frozen reference is copied before any adapter or unfreezing touches the model.
    # LoRA: TRL wraps the model itself and, given no reference, scores the reference with the
    # adapter disabled. (Handing it an already wrapped model makes it copy the fresh adapter into
    # a second "ref" adapter instead, which is saved with the artifact.)
    lora = config.method in ("lora", "surgical_lora")
    ref = None if lora else copy.deepcopy(lm.model).eval().requires_grad_(False)
    model = prepare(lm, config, wrap_lora=False)
    args = trl_args(DPOConfig, config, Path(out_dir), beta=config.beta, loss_type=["sigmoid"])
    dataset = Dataset.from_list([pair_messages(p) for p in pairs])
    return GuardedDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=dataset,
        processing_class=lm.tokenizer,
        peft_config=lora_config(config) if lora else None,
    )


def train_dpo(
    lm: LoadedModel,
    pairs: Sequence[PreferencePair],
    config: DPORunConfig,
    out_dir: str | os.PathLike,
) -> TuneResult:
    """Optimise ``lm`` (in place) on ``pairs``; write the artifact, ``log.jsonl`` and
    ``result.json`` into ``out_dir``. Raises ``TrainingDiverged`` on a non-finite loss/gradient."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_dpo_trainer(lm, pairs, config, out)
    snapshot = snapshot_trainable(trainer.model, config)
    return run_trainer(trainer, lm, config, out, "dpo", snapshot)
