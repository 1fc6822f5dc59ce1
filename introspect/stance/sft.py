"""Supervised fine-tuning on stance answers with TRL's SFTTrainer.

Rows become conversational prompt/completion pairs (``corpus.sft_messages``), so TRL applies the
model's chat template and, with ``completion_only_loss``, puts the loss on the assistant answer
only: the prompt's labels are -100. Any of the four methods of ``tuning.py`` picks the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from introspect.errors import IntrospectError
from introspect.models import LoadedModel
from introspect.stance.corpus import SFTRow, sft_messages
from introspect.stance.tuning import (
    GuardMixin,
    TuneConfig,
    TuneResult,
    prepare,
    run_trainer,
    snapshot_trainable,
    trl_args,
)


@dataclass
class SFTRunConfig(TuneConfig):
    """SFT run: the method and optimiser settings of :class:`TuneConfig`, nothing more."""


class GuardedSFTTrainer(GuardMixin, SFTTrainer):
    """SFTTrainer that stops on a non-finite loss."""


def build_sft_trainer(
    lm: LoadedModel, rows: Sequence[SFTRow], config: SFTRunConfig, out_dir: str | os.PathLike
) -> GuardedSFTTrainer:
    """Prepare ``lm.model`` for ``config.method`` (in place) and wrap it in a trainer."""
    if not rows:
        raise IntrospectError("rows: the SFT corpus is empty")
    model = prepare(lm, config)
    args = trl_args(SFTConfig, config, Path(out_dir), completion_only_loss=True)
    dataset = Dataset.from_list([sft_messages(r) for r in rows])
    return GuardedSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=lm.tokenizer
    )


def train_sft(
    lm: LoadedModel, rows: Sequence[SFTRow], config: SFTRunConfig, out_dir: str | os.PathLike
) -> TuneResult:
    """Fine-tune ``lm`` (in place) on ``rows``; write the artifact, ``log.jsonl`` and
    ``result.json`` into ``out_dir``. Raises ``TrainingDiverged`` on a non-finite loss/gradient."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_sft_trainer(lm, rows, config, out)
    snapshot = snapshot_trainable(trainer.model, config)
    return run_trainer(trainer, lm, config, out, "sft", snapshot)
