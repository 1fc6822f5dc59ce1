"""B7 localisation probes: which layers, how strong, which sentence? (zero-shot or trained)

A trial is a three-sentence user message and a fixed reply, read with a random unit vector added
to ONE sentence's tokens, in one of the early/middle/late layer ranges
(:func:`introspect.data.layer_ranges`), at one of three strengths (factors of the range's mean
residual norm, measured on the base model). The injection is removed and one question is asked
with multi-way answer tokens (" early"/" middle"/" late", " weak"/" medium"/" strong",
" first"/" second"/" third"; each checked to be one token): the answer is the argmax of the K
answer-token logits after the prefill "The answer is". Labels are balanced within each question,
so chance is 1/3; accuracy gets a Wilson interval, and the confusion matrix shows a model that
always gives one answer.

The same trials train Phase C (:mod:`introspect.localize_train`), on the even-indexed sentences
and the training rows of the vector set; B7 uses the odd-indexed sentences and held-out rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from introspect.config import parse
from introspect.data import layer_ranges
from introspect.detection import DetectionExample, DetectionPrompt, build_prompt, messages
from introspect.errors import IntrospectError
from introspect.evals.common import (
    FullRun,
    MassFilter,
    ModelConfig,
    Progress,
    answer_ids,
    figure,
    finish,
    fmt_rate,
    load_model,
    model_call,
    model_dims,
    model_label,
    rate,
    rate_bars,
    read_resource,
    row_steering,
    score_choices,
    suite_mapper,
)
from introspect.io import markdown_table
from introspect.models import LoadedModel

Question = Literal["layers", "strength", "sentence"]
QUESTIONS: tuple[str, ...] = get_args(Question)
STRENGTHS = ("weak", "medium", "strong")


class LocalizationTrials(MassFilter):
    """What B7's trials are made of; shared by B7 and Phase C training
    (:class:`introspect.localize_train.LocalizeTrainConfig`)."""

    vectors: str | None = Field(
        None,
        description="random vector file (default: 200 random unit vectors, seed 42, rows < 100 "
        "for training)",
    )
    questions: list[Question] | None = Field(
        None, min_length=1, description="questions asked: layers, strength, sentence (default: all)"
    )
    n_per_question: int = Field(30, ge=1, description="B7 evaluation trials per question")
    strength_factors: list[Annotated[float, Field(gt=0)]] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="weak, medium, strong: factors of the layer range's mean residual norm "
        "(default: those in resources/evals/localization.json)",
    )
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")


class LocalizationConfig(FullRun, LocalizationTrials, ModelConfig):
    """B7: which layers, how strong, which sentence was steered (zero-shot or trained)?"""

    FULL: ClassVar[dict] = {"n_per_question": 300}

    seed: int = Field(1234, description="seed of the trials drawn")


def default_vectors(d_model: int, path: str | None = None, model: str = ""):
    """The vector set trials draw from: a file, or the CLI's default random set (200, seed 42,
    rows < 100 for training)."""
    from introspect.vectors import VectorSet, load_vectors, random_vectors

    if path:
        return load_vectors(path, d_model)
    return VectorSet(random_vectors(d_model, 200, 42), model, "random", 100, name="random")


def norm_contexts(texts: dict) -> list[str]:
    """Messages like the trials' (three sentences each) on which residual norms are measured."""
    s = texts["sentences"]
    return [" ".join(s[i : i + 3]) for i in range(0, len(s) - 2, 3)]


def localization_trials(
    n_layers: int,
    norms: list[float],
    vector_rows: range,
    n_per_question: int,
    split: str = "eval",
    questions: list[str] | None = None,
    strength_factors: list[float] | None = None,
    seed: int = 0,
    texts: dict | None = None,
) -> pd.DataFrame:
    """Balanced trials: for each question, ``n_per_question`` rows whose labels cycle through
    the three classes; the other two factors, the sentences and the vector are drawn at random.

    ``split`` picks the sentence pool: "train" the even-indexed sentences, "eval" the odd.
    ``norms`` are the per-layer residual norms that turn strength factors into magnitudes.
    """
    texts = texts or read_resource("localization.json")
    pool = texts["sentences"][0 if split == "train" else 1 :: 2]
    if len(pool) < 3:
        raise IntrospectError("sentences: need at least 3 sentences in each split")
    if len(vector_rows) == 0:
        raise IntrospectError(f"vectors: no rows for the {split} split")
    factors = strength_factors or texts["strength_factors"]
    ranges = list(layer_ranges(n_layers).items())
    rng = np.random.default_rng(seed)
    rows = []
    for question in questions or QUESTIONS:
        for i in range(n_per_question):
            # (layer range, strength, sentence): the asked-about one cycles, so labels are
            # balanced; the other two are drawn
            draws = [int(x) for x in rng.integers(3, size=3)]
            label = draws[QUESTIONS.index(question)] = i % 3
            r, m, k = draws
            name, (start, end) = ranges[r]
            sentences = [pool[j] for j in rng.choice(len(pool), size=3, replace=False)]
            rows.append(
                {
                    "key": f"{split}:{question}:{i}",
                    "question": question,
                    "label": label,
                    "sentences": json.dumps(sentences),
                    "steered_sentence": k,
                    "layers": name,
                    "layer_start": start,
                    "layer_end": end,
                    "strength": STRENGTHS[m],
                    "factor": float(factors[m]),
                    "magnitude": float(factors[m] * np.mean(norms[start:end])),
                    "vector_idx": int(vector_rows[int(rng.integers(len(vector_rows)))]),
                }
            )
    return pd.DataFrame(rows)


def sentence_positions(
    tokenizer, example: DetectionExample, sentences: list[str], k: int
) -> tuple[int, int]:
    """The token slice of sentence ``k`` in the prefix of ``example`` (whose context is the
    sentences joined by spaces): every prefix token whose characters overlap the sentence."""
    prefix_msgs, _ = messages(example)
    prefix_text = tokenizer.apply_chat_template(prefix_msgs, tokenize=False)
    at = prefix_text.find(example.context_prompt)
    if at < 0 or prefix_text.find(example.context_prompt, at + 1) >= 0:
        raise IntrospectError("sentences: the context must appear exactly once in the prompt")
    start = at + sum(len(s) + 1 for s in sentences[:k])
    end = start + len(sentences[k])
    enc = tokenizer(prefix_text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return tokens[0], tokens[-1] + 1


def localization_prompts(
    tokenizer,
    trials: pd.DataFrame,
    vectors: torch.Tensor,
    texts: dict | None = None,
    system_prompt: str | None = None,
) -> list[DetectionPrompt]:
    """One steered prompt per trial: the vector added to the chosen sentence's tokens only."""
    texts = texts or read_resource("localization.json")
    out = []
    for r in trials.itertuples():
        q = texts["questions"][r.question]
        sentences = json.loads(r.sentences)
        example = DetectionExample(
            context_prompt=" ".join(sentences),
            assistant_response=texts["reply"],
            detection_question=q["question"],
            system_prompt=system_prompt,
            answer_tokens=tuple(q["answer_tokens"]),
        )
        prompt = build_prompt(tokenizer, example)
        positions = sentence_positions(tokenizer, example, sentences, int(r.steered_sentence))
        steering = row_steering(vectors, r, positions)
        ids = answer_ids(tokenizer, q["answer_tokens"])
        out.append(replace(prompt, answer_ids=ids, steering=steering))
    return out


def score_localization(
    lm: LoadedModel,
    shard: pd.DataFrame,
    vectors: torch.Tensor,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``probs`` (the three answer probabilities), ``predicted``,
    ``answer_mass``."""
    prompts = localization_prompts(lm.tokenizer, shard, vectors, system_prompt=system_prompt)
    probs, mass = score_choices(lm, prompts, batch_size)
    return pd.DataFrame(
        {
            "key": shard["key"].to_numpy(),
            "probs": probs,
            "predicted": [int(np.argmax(p)) for p in probs],
            "answer_mass": mass,
        }
    )


def localization_metrics(results: pd.DataFrame, min_mass: float = 0.0) -> dict:
    """Per question: accuracy (Wilson) against chance 1/3, the confusion matrix (rows = truth),
    how often each answer is given, and the mean answer-token mass. Trials whose mass on the
    three answer tokens is under ``min_mass`` are left out of all but the mass, and counted."""
    out = {}
    texts = read_resource("localization.json")
    for question, all_rows in results.groupby("question", sort=False):
        df = all_rows[all_rows["answer_mass"] >= min_mass]
        confusion = np.zeros((3, 3), dtype=int)
        for t, p in zip(df["label"], df["predicted"], strict=True):
            confusion[int(t), int(p)] += 1
        correct = int(np.trace(confusion))
        out[question] = {
            "answers": [a.strip() for a in texts["questions"][question]["answer_tokens"]],
            "accuracy": rate(correct, len(df)),
            "chance": 1 / 3,
            "confusion": confusion.tolist(),
            "answer_rates": (confusion.sum(0) / max(len(df), 1)).tolist(),
            "mean_answer_mass": float(all_rows["answer_mass"].mean()),
            "excluded": len(all_rows) - len(df),
            "min_mass": min_mass,
        }
    return out


def summary_markdown(metrics: dict, title: str, note: str = "", level: int = 3) -> str:
    rows = []
    for q, m in metrics.items():
        lo = m["accuracy"]["ci"][0]
        rows.append(
            {
                "question": q,
                "n": m["accuracy"]["n"],
                "accuracy [95% CI]": fmt_rate(m["accuracy"]),
                "chance": "0.33",
                "above chance": "yes" if lo > 1 / 3 else "no",
                "answers given": ", ".join(
                    f"{a} {r:.0%}" for a, r in zip(m["answers"], m["answer_rates"], strict=True)
                ),
                "answer mass": f"{m['mean_answer_mass']:.2f}",
                f"excluded (mass < {m.get('min_mass', 0):g})": m.get("excluded", 0),
            }
        )
    return (
        f"{'#' * level} {title}\n\n{note}"
        "Accuracy = argmax of the three answer-token logits equals the truth; labels are "
        "balanced, so chance is 1/3. 'Above chance' = the Wilson 95 % interval lies above 1/3. "
        "'Answers given' shows a model that always picks one option.\n\n"
        + markdown_table(rows, list(rows[0]))
    )


def plot(metrics: dict, path: Path, title: str) -> None:
    """Accuracy per question with intervals and chance, and the confusion matrices."""
    qs = list(metrics)
    with figure(path, 1, len(qs) + 1, figsize=(3.6 * (len(qs) + 1), 3.6)) as (fig, axes):
        ax = axes[0]
        rate_bars(ax, qs, [metrics[q]["accuracy"] for q in qs], capsize=4, color="C0")
        ax.axhline(1 / 3, color="C3", ls="--", lw=1, label="chance")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% CI)")
        ax.legend(fontsize=8)
        for ax, q in zip(axes[1:], qs, strict=True):
            c = np.array(metrics[q]["confusion"])
            ax.imshow(c, cmap="Blues", vmin=0)
            names = metrics[q]["answers"]
            ax.set_xticks(range(3), names, fontsize=8)
            ax.set_yticks(range(3), names, fontsize=8)
            ax.set_xlabel("answered")
            ax.set_ylabel("truth")
            ax.set_title(q, fontsize=9)
            for i in range(3):
                for j in range(3):
                    ink = "white" if c[i, j] > c.max() / 2 else "black"
                    ax.text(j, i, str(c[i, j]), ha="center", va="center", color=ink, fontsize=9)
        fig.suptitle(title, fontsize=10)


def evaluate_localization(
    lm: LoadedModel | None,
    cfg: LocalizationConfig,
    norms: list[float] | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, dict]:
    """B7 on held-out vectors and the evaluation sentences: results table and metrics.

    Norms are measured on the base (adapter off) of ``lm``, else of the mapper's model, unless
    given; ``mapper`` and
    ``progress`` (as in :func:`introspect.evals.common.suite_mapper`) run the scoring."""
    from introspect.activations import base_residual_norms

    texts = read_resource("localization.json")
    n_layers, d_model = model_dims(cfg, lm)
    vs = default_vectors(d_model, cfg.vectors, cfg.model)
    if norms is None:
        norms = model_call(cfg, lm, mapper, base_residual_norms, prompts=norm_contexts(texts))
    trials = localization_trials(
        n_layers,
        norms,
        range(vs.n_train, len(vs.vectors)),
        cfg.n_per_question,
        "eval",
        cfg.questions,
        cfg.strength_factors,
        cfg.seed,
        texts,
    )
    scores = suite_mapper(cfg, lm, mapper, progress)(
        score_localization,
        trials,
        vectors=vs.vectors,
        batch_size=cfg.batch_size,
        system_prompt=cfg.system_prompt,
    )
    results = trials.merge(scores, on="key")
    return results, localization_metrics(results, cfg.min_mass)


def run_localization(
    config: LocalizationConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage (B7, zero-shot or on a trained adapter): trials, scores, metrics, files."""
    cfg = parse(LocalizationConfig, config)
    if lm is None and mapper is None:
        lm = load_model(cfg)
    results, per_question = evaluate_localization(lm, cfg, mapper=mapper, progress=progress)
    title = f"B7 localisation probes: {model_label(cfg)}"
    plot(per_question, Path(out_dir) / "localization.png", title)
    summary = (
        summary_markdown(per_question, title, f"{cfg.n_per_question} trials per question. ")
        + "\n![B7 accuracy and confusion matrices](localization.png)\n"
    )
    tables = {"results.parquet": results}
    return finish(cfg, out_dir, {"questions": per_question}, summary, tables)
