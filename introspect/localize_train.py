"""Phase C: train localisation (which layers, how strong, which sentence) with the detection loop.

Training trials are B7's trials (:mod:`introspect.evals.localization`) drawn from the training
sentences and the training rows of the vector set: each steers one sentence's tokens in one
layer range at one strength and asks one of the three questions, with K single-token answers
(3, 3, ``n_sentences``); the label is the index of the right answer. The detection training loop
(:func:`introspect.train.train_prompts`) does cross-entropy over the K answer logits. The
trained model is then evaluated with B7 on held-out vectors and held-out sentences, beside the
base model's zero-shot B7 on the same trials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pandas as pd
import torch
from pydantic import ConfigDict, Field, field_validator
from typing_extensions import TypedDict

from introspect.config import parse
from introspect.errors import IntrospectError
from introspect.evals.common import (
    FullRun,
    ModelConfig,
    Progress,
    finish,
    fmt_rate,
    load_model,
    read_resource,
)
from introspect.evals.localization import (
    QUESTIONS,
    LocalizationConfig,
    LocalizationTrials,
    concept_set,
    default_vectors,
    evaluate_localization,
    localization_prompts,
    norm_contexts,
    trial_set,
)
from introspect.evals.localization_report import plot, summary_markdown
from introspect.models import LoadedModel
from introspect.train import TrainConfig, preset


def train_defaults() -> dict:
    """Short-run settings for CPU (peak LR reached fast, frequent validation). The loss also
    teaches the answer format (``mass_weight`` 1): the base model puts a quarter of its mass on
    " first" ... " tenth", and B7's mass filter would leave out what the 2-way loss alone
    learns."""
    return {
        "lr": 5e-4,
        "warmup_steps": 10,
        "eval_every": 15,
        "save_every": 45,
        "val_max_examples": 128,
        "epochs": 1.0,
        "mass_weight": 1.0,
    }


# A dict type of any subset of TrainConfig's fields, each checked as there (so an error names
# ``train.<field>``); the value stays a plain dict of what was given.
TrainOverrides = TypedDict(
    "TrainOverrides",
    {
        n: Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        for n, f in TrainConfig.model_fields.items()
    },
    total=False,
)
TrainOverrides.__pydantic_config__ = ConfigDict(extra="forbid", strict=True)


class LocalizeTrainConfig(FullRun, LocalizationTrials, ModelConfig):
    """Phase C: train localisation with the detection loop, then evaluate it with B7."""

    FULL: ClassVar[dict] = {
        "n_train": 6000,
        "n_val": 300,
        "n_per_question": 300,
        "train": {"epochs": 2.0},
    }

    n_train: int = Field(720, ge=1, description="training trials, split evenly over the questions")
    n_val: int = Field(72, ge=1, description="validation trials")
    eval_base: bool = Field(True, description="also B7 on the untrained model, on the same trials")
    train: TrainOverrides = Field(  # type: ignore[valid-type]
        {},
        description="TrainConfig overrides (e.g. lr, max_steps, batch_size) over the short CPU "
        "run's defaults",
    )
    seed: int = Field(0, description="seed of the training trials and of training")

    @field_validator("train")
    @classmethod
    def _a_training_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            preset("original", **{**train_defaults(), **v})
        except IntrospectError as e:
            raise ValueError(str(e)) from None
        return v

    def train_config(self) -> TrainConfig:
        """The run's TrainConfig: the short-run defaults, the seed, then ``train``."""
        return preset("original", **{**train_defaults(), "seed": self.seed, **self.train})


def localization_data(
    lm: LoadedModel, cfg: LocalizeTrainConfig, norms: list[float]
) -> tuple[pd.DataFrame, pd.DataFrame, torch.Tensor]:
    """Training and validation trials (training sentences, training vector rows) and the
    vectors they index."""
    qs = cfg.questions or list(QUESTIONS)
    concepts = concept_set(cfg, lm, None, lm.d_model) if "concept" in qs else None

    def draw(n: int, seed: int) -> tuple[pd.DataFrame, torch.Tensor]:
        return trial_set(cfg, lm, None, norms, "train", -(-n // len(qs)), seed, concepts)

    train, vectors = draw(cfg.n_train, cfg.seed)
    val, _ = draw(cfg.n_val, cfg.seed + 10_000)
    val["key"] = "val:" + val["key"]
    train = train.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    return train, val, vectors


def verdicts(after: dict, steps: int, n_train: int) -> str:
    """One line per question: above chance or not, and if not, how far and on how little."""
    lines = []
    for q, m in after.items():
        acc, chance = m["accuracy"], m["chance"]
        if not acc["n"]:
            lines.append(
                f"- **{q}**: not measurable: all {m['excluded']} trials are under the mass "
                f"filter (mean answer mass {m['mean_answer_mass']:.2f})."
            )
        elif acc["ci"][0] > chance:
            lines.append(f"- **{q}**: above chance ({fmt_rate(acc)} against {chance:.2f}).")
        else:
            lines.append(
                f"- **{q}**: not above chance: {fmt_rate(acc)} against {chance:.2f}, after "
                f"only {steps} steps on {n_train} trials (a short run; "
                "`benchmarks/localization_runs.sh` trains each question on 1,600)."
            )
    return "\n".join(lines) + "\n"


def run_localization_training(
    config: LocalizeTrainConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage (Phase C): data, base B7, training, trained B7, files (run in out/run).

    ``lm`` is trained in place (loaded from the config when not given); ``progress`` is passed
    to the training loop."""
    from introspect import models
    from introspect.activations import base_residual_norms
    from introspect.train import train_prompts

    cfg = parse(LocalizeTrainConfig, config)
    lm = lm or load_model(cfg)
    out = Path(out_dir)
    texts = read_resource("localization.json")
    norms = base_residual_norms(lm, norm_contexts(texts))
    eval_cfg = LocalizationConfig(
        model=cfg.model, **cfg.model_dump(include=set(LocalizationTrials.model_fields))
    )
    before, tables = None, {}
    if cfg.eval_base:
        # Kept whole: the base model often puts little mass on the answers, so its zero-shot
        # rate under the mass filter may rest on few rows; the table has every row's answer.
        tables["results_base.parquet"], before = evaluate_localization(lm, eval_cfg, norms)

    train_df, val_df, vectors = localization_data(lm, cfg, norms)
    vs = default_vectors(lm.d_model, cfg.vectors, lm.name)
    train_cfg = cfg.train_config()
    t0 = time.perf_counter()
    result = train_prompts(
        lm,
        localization_prompts(lm.tokenizer, train_df, vectors, texts, cfg.system_prompt),
        train_df["label"].tolist(),
        localization_prompts(lm.tokenizer, val_df, vectors, texts, cfg.system_prompt),
        val_df["label"].tolist(),
        train_cfg,
        out / "run",
        resume=(out / "run").exists(),
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    # B7 on the best model by validation accuracy (as the detection runs are evaluated)
    best = out / "run" / ("best" if (out / "run" / "best").is_dir() else "final")
    trained = models.load(cfg.model, dtype=lm.model.dtype, device=lm.device, adapter=best)
    results, after = evaluate_localization(trained, eval_cfg, norms)

    title = f"Phase C localisation training: {cfg.model}"
    plot(after, out / "localization_trained.png", f"B7 after Phase C training ({cfg.model})")
    summary = (
        f"### {title}\n\n"
        f"LoRA trained on {len(train_df)} trials ({', '.join(cfg.questions or QUESTIONS)}; "
        f"training sentences, vector rows < {vs.n_train}), {result.steps} steps in "
        f"{train_s:.0f} s; best validation accuracy {result.best_val_accuracy:.3f} at step "
        f"{result.best_step}, whose weights are evaluated with B7 on held-out sentences and "
        f"vectors ({cfg.n_per_question} trials per question).\n\n"
    )
    if before is not None:
        summary += summary_markdown(before, "B7 before training (zero-shot)", level=4) + "\n"
        plot(before, out / "localization_base.png", f"B7 zero-shot ({cfg.model})")
    summary += (
        summary_markdown(after, "B7 after training (best checkpoint)", level=4)
        + "\n"
        + verdicts(after, result.steps, len(train_df))
        + "\n![B7 after training](localization_trained.png)\n"
    )
    training = {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_val_accuracy": result.best_val_accuracy,
        "final_val_accuracy": result.final_val_accuracy,
        "seconds": train_s,
        "n_train": len(train_df),
        "n_val": len(val_df),
        "config": train_cfg.model_dump(),
    }
    metrics = {"before": before, "after": after, "training": training}
    return finish(cfg, out, metrics, summary, {"results.parquet": results, **tables})
