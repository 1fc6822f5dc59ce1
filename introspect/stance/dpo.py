"""Direct preference optimisation on stance pairs with TRL's DPOTrainer.

Pairs become conversational prompt/chosen/rejected (``corpus.pair_messages``): TRL applies the
chat template and scores only the answer tokens. The loss is the sigmoid DPO loss

    −log σ(β [(log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))])

with log π summed over the answer tokens. The reference π_ref is the base model with the adapter
disabled for the LoRA methods, and a frozen copy of the starting model for full / selective.

TRL is imported when a trainer is built, not with this module: the config stays cheap to import.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import model_validator

from introspect.errors import IntrospectError
from introspect.models import LoadedModel
from introspect.stance.corpus import PreferencePair, pair_messages
from introspect.stance.tuning import (
    DPOSettings,
    Progress,
    TuneConfig,
    TuneResult,
    check_layers,
    dpo_defaults,
    guarded,
    lora_config,
    prepare,
    train_with,
    trl_args,
)


class DPORunConfig(DPOSettings, TuneConfig):  # this order lists beta last
    """DPO run: :class:`TuneConfig` plus β; ``lr`` defaults to ``tuning.DPO_LR``."""

    @model_validator(mode="before")
    @classmethod
    def _dpo_lr(cls, data: Any) -> Any:
        return dpo_defaults(data)


def build_dpo_trainer(
    lm: LoadedModel,
    pairs: Sequence[PreferencePair],
    config: DPORunConfig,
    out_dir: str | os.PathLike,
):
    """Prepare ``lm.model`` for ``config.method`` (in place) and wrap it in a trainer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise IntrospectError("pairs: the preference corpus is empty")
    check_layers(config, lm.n_layers)
    # The frozen reference is copied before any adapter or unfreezing touches the model.
    # LoRA: TRL wraps the model itself and, given no reference, scores the reference with the
    # adapter disabled. (Handing it an already wrapped model makes it copy the fresh adapter into
    # a second "ref" adapter instead, which is saved with the artifact.)
    lora = config.method in ("lora", "surgical_lora")
    ref = None if lora else copy.deepcopy(lm.model).eval().requires_grad_(False)
    model = prepare(lm, config, wrap_lora=False)
    args = trl_args(DPOConfig, config, Path(out_dir), beta=config.beta, loss_type=["sigmoid"])
    dataset = Dataset.from_list([pair_messages(p) for p in pairs])
    return guarded(DPOTrainer)(
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
    progress: Progress | None = None,
) -> TuneResult:
    """Optimise ``lm`` (in place) on ``pairs``, as :func:`introspect.stance.tuning.train_with`."""
    return train_with(build_dpo_trainer, lm, pairs, config, out_dir, "dpo", progress)
