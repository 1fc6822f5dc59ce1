"""Supervised fine-tuning on stance answers with TRL's SFTTrainer.

Rows become conversational prompt/completion pairs (``corpus.sft_messages``), so TRL applies the
model's chat template and, with ``completion_only_loss``, puts the loss on the assistant answer
only: the prompt's labels are -100. Any of the four methods of ``tuning.py`` picks the weights.

TRL is imported when a trainer is built, not with this module: the config stays cheap to import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from introspect.errors import IntrospectError
from introspect.models import LoadedModel
from introspect.stance.corpus import SFTRow, sft_messages
from introspect.stance.tuning import (
    Progress,
    TuneConfig,
    TuneResult,
    guarded,
    prepare,
    train_with,
    trl_args,
)


class SFTRunConfig(TuneConfig):
    """SFT run: the method and optimiser settings of :class:`TuneConfig`, nothing more."""


def build_sft_trainer(
    lm: LoadedModel, rows: Sequence[SFTRow], config: SFTRunConfig, out_dir: str | os.PathLike
):
    """Prepare ``lm.model`` for ``config.method`` (in place) and wrap it in a trainer."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not rows:
        raise IntrospectError("rows: the SFT corpus is empty")
    model = prepare(lm, config)
    args = trl_args(SFTConfig, config, Path(out_dir), completion_only_loss=True)
    dataset = Dataset.from_list([sft_messages(r) for r in rows])
    return guarded(SFTTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=lm.tokenizer
    )


def train_sft(
    lm: LoadedModel,
    rows: Sequence[SFTRow],
    config: SFTRunConfig,
    out_dir: str | os.PathLike,
    progress: Progress | None = None,
) -> TuneResult:
    """Fine-tune ``lm`` (in place) on ``rows``, as :func:`introspect.stance.tuning.train_with`."""
    return train_with(build_sft_trainer, lm, rows, config, out_dir, "sft", progress)
