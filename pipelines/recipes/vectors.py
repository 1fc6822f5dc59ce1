"""Recipe ``vectors``: a steering vector set, random (Gaussian unit rows) or concept directions."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from introspect.config import ModelChoice

OUTPUT = "file"  # one .safetensors file; the set is named by its stem


class Config(ModelChoice):
    type: Literal["random", "concepts"] = Field(
        "random", description="random unit vectors, or mean-difference concept directions"
    )
    n: int = Field(200, ge=1, description="vectors (concepts: the first n of the concept list)")
    n_train: int | None = Field(
        None, ge=0, description="random: rows < n_train are for training (default: n // 2)"
    )
    seed: int = Field(0, description="random seed (random vectors)")
    layer: int | None = Field(
        None, ge=0, description="concepts: the layer they are read at (default: 2/3 of the depth)"
    )
    concepts: str | None = Field(
        None, description="concepts: JSON with 'concepts' and 'templates' lists (default: ours)"
    )
    batch_size: int = Field(16, ge=1, description="concepts: prompts per forward pass")


def run(config: Config, out: Path, context) -> dict:
    from introspect import models
    from introspect.vectors import (
        VectorSet,
        concept_vectors,
        default_concepts,
        random_vectors,
        read_concepts,
        save_vectors,
    )

    if config.type == "random":
        _, d_model = models.dims(config.model)
        n_train = config.n_train if config.n_train is not None else config.n // 2
        vs = VectorSet(
            random_vectors(d_model, config.n, config.seed), config.model, "random", n_train
        )
    else:
        words, templates = read_concepts(config.concepts) if config.concepts else default_concepts()
        lm = models.load(config.model, dtype=config.dtype)
        vs = concept_vectors(lm, words[: config.n], templates, config.layer, config.batch_size)
    vs.name = out.stem
    save_vectors(out, vs)
    return {
        "n": int(vs.vectors.shape[0]),
        "d_model": int(vs.vectors.shape[1]),
        "kind": config.type,
        "n_train": int(vs.n_train),
        "layer": vs.layer,
    }


def summary(metrics: dict, out: Path) -> str:
    where = f", read at layer {metrics['layer']}" if metrics["kind"] == "concepts" else ""
    return (
        f"wrote {metrics['n']} {metrics['kind']} vectors (d_model={metrics['d_model']}, "
        f"{metrics['n_train']} for training{where}) to {out}"
    )
