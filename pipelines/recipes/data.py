"""Recipe ``data``: training and validation examples for one of seed 002's variants."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from introspect.config import ModelChoice
from introspect.data import DataConfig


class Config(DataConfig, ModelChoice):
    vectors: str = Field(description="vector file (.safetensors) the steered rows draw from")
    prompts: str | None = Field(None, description="JSON overriding the shipped texts")
    norms: str | None = Field(
        None, description="relative: a norms stage's norms.json (default: measure them here)"
    )


def run(config: Config, out: Path, context) -> dict:
    from introspect import models
    from introspect.activations import residual_norms
    from introspect.data import default_prompts, make_examples, read_prompts, split
    from introspect.examples import write_examples
    from introspect.io import write_json
    from introspect.vectors import load_vectors

    texts = read_prompts(config.prompts) if config.prompts else default_prompts()
    n_layers, d_model = models.dims(config.model)
    vs = load_vectors(config.vectors, d_model)
    norms = None
    if config.magnitude_mode == "relative" and config.norms:
        from pipelines.recipes.norms import read_norms

        norms = read_norms(config.norms, config.model, n_layers)
    elif config.magnitude_mode == "relative":
        lm = models.load(config.model, dtype=config.dtype)
        norms = residual_norms(lm, texts["context_prompts"])
    examples = make_examples(config, n_layers, vs, texts, norms)
    # The split's own seed stays 0: `seed` already draws the examples, and plans always split so.
    train, val = split(examples, config.val_fraction, 0)
    write_examples(train, out / "train.parquet")
    write_examples(val, out / "val.parquet")
    if norms is not None:
        write_json(out / "norms.json", norms)
    (out / "summary.md").write_text(
        f"### Data `{context.name or out.name}`\n\n{len(train)} training / {len(val)} "
        "validation examples, variant "
        f"`{config.variant}`, magnitudes {config.magnitudes} ({config.magnitude_mode}).\n"
    )
    return {"n_train": len(train), "n_val": len(val), "variant": config.variant}


def summary(metrics: dict, out: Path) -> str:
    return (
        f"wrote {metrics['n_train']} train / {metrics['n_val']} val '{metrics['variant']}' "
        f"examples to {out}"
    )
