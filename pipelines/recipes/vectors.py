"""Recipe ``vectors``: a steering vector set: random (Gaussian unit rows), concept directions
(mean difference), or the transfer-matrix families ``matched`` (random with the activations'
covariance) and ``contrast`` (contrast-pair PCA); see :mod:`introspect.vector_families`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from introspect.config import ModelChoice
from introspect.errors import IntrospectError

OUTPUT = "file"  # one .safetensors file; the set is named by its stem


class Config(ModelChoice):
    type: Literal["random", "concepts", "matched", "contrast"] = Field(
        "random",
        description="random unit vectors, mean-difference concept directions, random with the "
        "activations' covariance (matched), or contrast-pair PCA directions (contrast)",
    )
    n: int = Field(200, ge=1, description="vectors (concepts: the first n of the concept list)")
    n_train: int | None = Field(
        None,
        ge=0,
        description="rows < n_train are for training (default: random and matched n // 2, "
        "concepts and contrast 0: all rows are for evaluation)",
    )
    seed: int = Field(0, description="random seed (random and matched vectors)")
    layer: int | None = Field(
        None,
        ge=0,
        description="concepts, matched, contrast: the layer activations are read at "
        "(default: 2/3 of the depth)",
    )
    concepts: str | None = Field(
        None,
        description="concepts, matched, contrast: JSON with 'concepts' and 'templates' lists "
        "(default: ours)",
    )
    batch_size: int = Field(16, ge=1, description="prompts per forward pass (not random)")


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
        from introspect.vector_families import contrast_vectors, matched_vectors

        words, templates = read_concepts(config.concepts) if config.concepts else default_concepts()
        lm = models.load(config.model, dtype=config.dtype)
        n_train = config.n_train if config.n_train is not None else 0
        words = words[: config.n]
        if config.n_train is not None and config.type != "matched" and n_train > len(words):
            raise IntrospectError(f"n_train: {n_train} is more than the {len(words)} concepts")
        if config.type == "concepts":
            vs = concept_vectors(lm, words, templates, config.layer, config.batch_size)
            vs.n_train = n_train
        elif config.type == "contrast":
            vs = contrast_vectors(lm, words, templates, n_train, config.layer, config.batch_size)
        else:
            prompts = [t.format(concept=c) for c in words for t in templates]
            n_train = config.n_train if config.n_train is not None else config.n // 2
            vs = matched_vectors(lm, prompts, config.n, n_train, config.seed, config.layer,
                                 config.batch_size)  # fmt: skip
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
    where = f", read at layer {metrics['layer']}" if metrics["layer"] is not None else ""
    return (
        f"wrote {metrics['n']} {metrics['kind']} vectors (d_model={metrics['d_model']}, "
        f"{metrics['n_train']} for training{where}) to {out}"
    )
