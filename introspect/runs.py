"""A training run's directory, and loading what it holds for evaluation.

Layout (written by :func:`introspect.train.train_prompts`)::

    RUN/config.json                 the TrainConfig and the base model's name
    RUN/best/, RUN/final/           save_pretrained exports: a LoRA adapter, or a whole model
                                    for full fine-tuning (``meta.json`` beside the weights)
    RUN/checkpoints/step-N/         mid-run checkpoints (``COMPLETE``, ``trainable.safetensors``)

"The model to evaluate" is a base model plus one of: a run directory (its best, else final
export), an adapter directory, a fully fine-tuned model directory, or a mid-run checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from introspect.checkpoints import COMPLETE, load_trainable
from introspect.config import parse
from introspect.errors import IntrospectError
from introspect.models import LoadedModel, load
from introspect.train import TrainConfig, prepare_model


def evaluated_parts(
    model: str, adapter: str | os.PathLike | None = None
) -> tuple[str, Path | None, str | os.PathLike | None]:
    """What :func:`load_evaluated` loads, without loading it: ``(base model, LoRA adapter
    directory or None, mid-run checkpoint or None)``; a fully fine-tuned model is its own base."""
    if adapter is None:
        return model, None, None
    # A run directory means its best model (else its final one); any other dir is used as is.
    exports = [Path(adapter) / sub for sub in ("best", "final") if (Path(adapter) / sub).is_dir()]
    adapter_dir = exports[0] if exports else Path(adapter)
    if (adapter_dir / "trainable.safetensors").exists():
        return model, None, adapter
    if not (adapter_dir / "adapter_config.json").exists():
        return str(adapter_dir), None, None  # a fully fine-tuned model directory
    return model, adapter_dir, None


def load_run_checkpoint(lm: LoadedModel, checkpoint: str | os.PathLike) -> LoadedModel:
    """A mid-run checkpoint (``RUN/checkpoints/step-N``) as a model ready to evaluate.

    The run's ``config.json`` rebuilds the adapter (or unfreezes for full fine-tuning), then the
    checkpoint's trainable weights are copied in. Modifies ``lm`` in place and returns it.
    """
    checkpoint = Path(checkpoint)
    config_path = checkpoint.parent.parent / "config.json"
    if not (checkpoint / COMPLETE).exists() or not config_path.exists():
        raise IntrospectError(
            f"checkpoint: {checkpoint} is not a complete checkpoint of a run (needs its "
            f"{COMPLETE} marker and the run's config.json two levels up)"
        )
    saved = json.loads(config_path.read_text())
    known = TrainConfig.model_fields
    config = parse(TrainConfig, {k: v for k, v in saved.items() if k in known}, str(config_path))
    prepare_model(lm, config)
    load_trainable(checkpoint, lm.model)
    lm.model.eval()
    return lm


def load_evaluated(
    model: str, adapter: str | os.PathLike | None = None, dtype: str | None = None, device=None
) -> LoadedModel:
    """The model to evaluate: the base ``model``, plus a run's best/final adapter, an adapter
    directory, a fully fine-tuned model directory, or a mid-run checkpoint (``RUN/checkpoints/
    step-N``)."""
    base, adapter_dir, checkpoint = evaluated_parts(model, adapter)
    lm = load(base, dtype=dtype, device=device, adapter=adapter_dir)
    return load_run_checkpoint(lm, checkpoint) if checkpoint else lm
