"""B7 localisation probes: which layers, how strong, which sentence? (zero-shot or trained)

A trial is a user message of ``n_sentences`` sentences (default 10) and a fixed reply, read with
a random unit vector added to ONE sentence's tokens, in one of the early/middle/late layer
ranges (:func:`introspect.data.layer_ranges`), at one of three strengths (factors of the range's
mean residual norm, measured on the base model). The injection is removed and one question is
asked with multi-way single-token answers (" early"/" middle"/" late", " weak"/" medium"/
" strong", " first" ... " tenth"): the answer is the argmax of the K answer-token logits after
the prefill "The answer is". Labels are balanced within each question, so chance is 1/K (3, 3,
``n_sentences``); accuracy gets a Wilson interval, the answer-prior baseline (always the most
common label) sits beside it, and the confusion matrix shows a model that always gives one answer.

The same trials train Phase C (:mod:`introspect.localize_train`), on the even-indexed sentences
and the training rows of the vector set; B7 uses the odd-indexed sentences and held-out rows, so
its sentences, its contexts and its vectors are never seen in training.
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
from pydantic import Field, model_validator

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
    finish,
    load_model,
    model_call,
    model_dims,
    model_label,
    rate,
    read_resource,
    row_steering,
    score_choices,
    suite_mapper,
)
from introspect.evals.concept_choice import (
    concept_choice_trials,
    concept_metrics,
    concept_question,
    listed,
    single_token_rows,
)
from introspect.evals.localization_report import plot, summary_markdown
from introspect.models import LoadedModel

Question = Literal["layers", "strength", "sentence", "concept"]
# The localisation questions, each about one factor of a trial (the default set); "concept" is
# the forced-choice identification question (:mod:`introspect.evals.concept_choice`).
QUESTIONS: tuple[str, ...] = get_args(Question)[:3]
STRENGTHS = ("weak", "medium", "strong")
MAX_SENTENCES = 10  # " first" ... " tenth" are single tokens for the shipped tokenizers
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


class LocalizationTrials(MassFilter):
    """What B7's trials are made of; shared by B7 and Phase C training
    (:class:`introspect.localize_train.LocalizeTrainConfig`)."""

    vectors: str | None = Field(
        None,
        description="random vector file (default: 200 random unit vectors, seed 42, rows < 100 "
        "for training)",
    )
    questions: list[Question] | None = Field(
        None,
        min_length=1,
        description="questions asked: layers, strength, sentence, concept (default: the first "
        "three)",
    )
    n_per_question: int = Field(30, ge=1, description="B7 evaluation trials per question")
    n_sentences: int = Field(
        10,
        ge=3,
        le=MAX_SENTENCES,
        description="sentences in the user message, one of them steered; the sentence question "
        "offers as many answers (first, second, ...)",
    )
    concept_vectors: str | None = Field(
        None,
        description="concept vector file with names for the concept question; its training "
        "rows train, the rest are evaluated (default: made on the base model from the shipped "
        "concept words, the first half for training)",
    )
    steer: Literal["sentence", "message"] = Field(
        "sentence",
        description="what the layers and strength questions' trials steer: one sentence of the "
        "message, as the sentence question must, or the whole message (as their question says: "
        "'while you read my previous message')",
    )
    layer_ranges: list[Literal["early", "middle", "late"]] | None = Field(
        None,
        min_length=1,
        description="layer ranges the strength and sentence questions' trials are steered "
        "in (default: all three; the layers question always draws from all three). Hahami et "
        "al. localise sentences only for early-layer injections",
    )
    sentence_marks: Literal["none", "numbers", "letters"] = Field(
        "none",
        description="what precedes each sentence of the message: nothing, '1. ', '2. ' ... "
        "(the sentence question still answers first, second, ...) or 'A. ', 'B. ' ... (the "
        "sentence question is answered with the letter)",
    )
    steer_marks: bool = Field(
        False,
        description="steer a sentence's mark with it: the mark names the sentence, so the "
        "answer can be read off the steered tokens themselves",
    )
    n_choices: int = Field(
        10,
        ge=2,
        le=20,
        description="concepts the concept question offers, the injected one among them",
    )
    concept_factor: float = Field(
        1.0,
        gt=0,
        description="concept injection strength: a factor of the concept layers' mean residual "
        "norm (B6's scale)",
    )
    strength_factors: list[Annotated[float, Field(gt=0)]] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="weak, medium, strong: factors of the layer range's mean residual norm "
        "(default: those in resources/evals/localization.json)",
    )
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")

    @model_validator(mode="after")
    def _marks_to_steer(self):
        if self.steer_marks and self.sentence_marks == "none":
            raise ValueError("steer_marks: there are no marks to steer (sentence_marks is none)")
        return self


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


def question(
    texts: dict, name: str, n_sentences: int, marks: str = "none"
) -> tuple[str, list[str]]:
    """The text of question ``name`` and its answer tokens, for a message of ``n_sentences``
    (``marks`` "letters": the sentence question asks for the sentence's letter)."""
    if name == "sentence" and marks == "letters":
        name = "sentence_letter"
    q = texts["questions"][name]
    if not name.startswith("sentence"):
        return q["question"], list(q["answer_tokens"])
    answers = list(q["answer_tokens"][:n_sentences])
    options = listed([a.strip() for a in answers])
    return q["question"].format(n=_NUMBERS[n_sentences - 2], options=options), answers


def n_options(name: str, n_sentences: int) -> int:
    """How many answers question ``name`` offers."""
    return n_sentences if name == "sentence" else 3


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
    n_sentences: int = 3,
    steer: str = "sentence",
    marks: str = "none",
    allowed_ranges: list[str] | None = None,
    steer_marks: bool = False,
) -> pd.DataFrame:
    """Balanced trials: for each question, ``n_per_question`` rows whose labels cycle through
    its K classes; the other two factors, the sentences and the vector are drawn at random.

    ``split`` picks the sentence pool: "train" the even-indexed sentences, "eval" the odd.
    ``norms`` are the per-layer residual norms that turn strength factors into magnitudes.
    ``steer`` "message": the layers and strength questions' trials steer the whole message
    (``steered_sentence`` -1); the sentence question always steers one sentence. ``marks``:
    what precedes each sentence (:func:`marks`), steered with it when ``steer_marks``.
    ``allowed_ranges``: the layer ranges the strength and sentence questions' trials are drawn
    from (default: all).
    """
    texts = texts or read_resource("localization.json")
    pool = texts["sentences"][0 if split == "train" else 1 :: 2]
    if len(pool) < n_sentences:
        raise IntrospectError(
            f"n_sentences: {n_sentences} is more than the {len(pool)} sentences of the "
            f"{split} split"
        )
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
            draws = [int(rng.integers(n_options(q, n_sentences))) for q in QUESTIONS]
            label = draws[QUESTIONS.index(question)] = i % n_options(question, n_sentences)
            r, m, k = draws
            if allowed_ranges and question != "layers":  # an extra draw only when restricted
                allowed = [i for i, (n, _) in enumerate(ranges) if n in allowed_ranges]
                r = allowed[int(rng.integers(len(allowed)))]
            name, (start, end) = ranges[r]
            picked = rng.choice(len(pool), size=n_sentences, replace=False)
            sentences = [pool[j] for j in picked]
            rows.append(
                {
                    "key": f"{split}:{question}:{i}",
                    "question": question,
                    "label": label,
                    "sentences": json.dumps(sentences),
                    "steered_sentence": -1 if steer == "message" and question != "sentence" else k,
                    "layers": name,
                    "layer_start": start,
                    "layer_end": end,
                    "strength": STRENGTHS[m],
                    "factor": float(factors[m]),
                    "magnitude": float(factors[m] * np.mean(norms[start:end])),
                    "vector_idx": int(vector_rows[int(rng.integers(len(vector_rows)))]),
                    "n_options": n_options(question, n_sentences),
                    "marks": marks,
                    "steer_marks": steer_marks,
                }
            )
    return pd.DataFrame(rows)


LETTERS = "ABCDEFGHIJ"


def marks(n: int, kind: str = "none") -> list[str]:
    """What precedes each sentence in the message: nothing, '1. ', '2. ' ... or 'A. ', 'B. '."""
    if kind == "numbers":
        return [f"{i + 1}. " for i in range(n)]
    if kind == "letters":
        return [f"{LETTERS[i]}. " for i in range(n)]
    return [""] * n


def context_text(sentences: list[str], kind: str = "none") -> str:
    """The user message: the sentences joined by spaces, each after its mark."""
    return " ".join(m + s for m, s in zip(marks(len(sentences), kind), sentences, strict=True))


def sentence_positions(
    tokenizer,
    example: DetectionExample,
    sentences: list[str],
    k: int,
    kind: str = "none",
    with_mark: bool = False,
) -> tuple[int, int]:
    """The token slice of sentence ``k`` in the prefix of ``example`` (whose context is
    :func:`context_text` with marks ``kind``): every prefix token whose characters overlap the
    sentence, and its mark ``with_mark``."""
    prefix_msgs, _ = messages(example)
    prefix_text = tokenizer.apply_chat_template(prefix_msgs, tokenize=False)
    at = prefix_text.find(example.context_prompt)
    if at < 0 or prefix_text.find(example.context_prompt, at + 1) >= 0:
        raise IntrospectError("sentences: the context must appear exactly once in the prompt")
    shown = [m + s for m, s in zip(marks(len(sentences), kind), sentences, strict=True)]
    end = at + sum(len(s) + 1 for s in shown[:k]) + len(shown[k])
    start = end - len(shown[k] if with_mark else sentences[k])
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
        sentences = json.loads(r.sentences)
        kind = r.marks if isinstance(getattr(r, "marks", None), str) else "none"
        with_mark = bool(getattr(r, "steer_marks", False) == 1)  # a missing value reads False
        if r.question == "concept":
            template = texts["questions"]["concept"]["question"]
            text, answers = concept_question(template, json.loads(r.options))
        else:
            text, answers = question(texts, r.question, len(sentences), kind)
        example = DetectionExample(
            context_prompt=context_text(sentences, kind),
            assistant_response=texts["reply"],
            detection_question=text,
            system_prompt=system_prompt,
            answer_tokens=tuple(answers),
        )
        prompt = build_prompt(tokenizer, example)
        k = int(r.steered_sentence)
        positions = sentence_positions(tokenizer, example, sentences, k, kind, with_mark)
        if k < 0:  # the whole message: from the first sentence's start to the last's end
            first = sentence_positions(tokenizer, example, sentences, 0, kind, with_mark)
            positions = (first[0], positions[1])
        steering = row_steering(vectors, r, positions)
        ids = answer_ids(tokenizer, answers)
        out.append(replace(prompt, answer_ids=ids, steering=steering))
    return out


def score_localization(
    lm: LoadedModel,
    shard: pd.DataFrame,
    vectors: torch.Tensor,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``probs`` (the K answer probabilities), ``predicted``,
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
    """Per question: accuracy (Wilson) against chance 1/K, the answer-prior baseline (always
    the most common label: 1/K on balanced trials), the confusion matrix (rows = truth), how
    often each answer is given, and the mean answer-token mass. Trials whose mass on the K answer
    tokens is under ``min_mass`` are left out of all but the mass, and counted."""
    out = {}
    texts = read_resource("localization.json")
    for name, all_rows in results.groupby("question", sort=False):
        k = int(all_rows["n_options"].iloc[0]) if "n_options" in all_rows else 3
        df = all_rows[all_rows["answer_mass"] >= min_mass]
        confusion = np.zeros((k, k), dtype=int)
        for t, p in zip(df["label"], df["predicted"], strict=True):
            confusion[int(t), int(p)] += 1
        correct = int(np.trace(confusion))
        if name == "concept":  # the offered words vary by trial: the answers are positions
            answers = [f"#{i + 1}" for i in range(k)]
        else:
            kind = all_rows["marks"].iloc[0] if "marks" in all_rows else "none"
            answers = [a.strip() for a in question(texts, name, k, kind)[1]]
        out[name] = {
            "answers": answers,
            "accuracy": rate(correct, len(df)),
            "chance": 1 / k,
            "n_options": k,
            "prior_accuracy": rate(int(confusion.sum(1).max()), len(df)),
            "confusion": confusion.tolist(),
            "answer_rates": (confusion.sum(0) / max(len(df), 1)).tolist(),
            "mean_answer_mass": float(all_rows["answer_mass"].mean()),
            "excluded": len(all_rows) - len(df),
            "min_mass": min_mass,
        }
        if name == "concept":
            out[name].update(concept_metrics(df))
    return out


def concept_set(cfg: LocalizationTrials, lm, mapper, d_model: int):
    """The concept question's vectors: ``cfg.concept_vectors``, else made on the base model
    from the shipped concept words, the first half for training."""
    from introspect.evals.concept_choice import base_concept_vectors
    from introspect.vectors import default_concepts, load_vectors

    if cfg.concept_vectors:
        vs = load_vectors(cfg.concept_vectors, d_model)
        if not vs.names:
            raise IntrospectError(f"concept_vectors: {cfg.concept_vectors} has no concept names")
        return vs
    words, templates = default_concepts()
    return model_call(cfg, lm, mapper, base_concept_vectors, words=words, templates=templates,
                      n_train=len(words) // 2)  # fmt: skip


def trial_set(
    cfg: LocalizationTrials,
    lm: LoadedModel | None,
    mapper,
    norms: list[float],
    split: str,
    n_per_question: int,
    seed: int,
    concepts=None,
) -> tuple[pd.DataFrame, torch.Tensor]:
    """The trials of ``split`` ("train": training sentences and vector rows; "eval": the
    held-out ones) for the questions ``cfg`` asks, and the vectors their ``vector_idx`` index:
    the random set, then the concept set (``concepts``, else :func:`concept_set`)."""
    from introspect.models import load_tokenizer
    from introspect.vectors import default_concept_layer

    texts = read_resource("localization.json")
    n_layers, d_model = model_dims(cfg, lm)
    vs = default_vectors(d_model, cfg.vectors, cfg.model)
    asked = cfg.questions or list(QUESTIONS)
    train = split == "train"
    parts, vectors = [], vs.vectors
    factors = [q for q in asked if q != "concept"]
    if factors:
        rows = range(vs.n_train) if train else range(vs.n_train, len(vs.vectors))
        parts.append(
            localization_trials(
                n_layers, norms, rows, n_per_question, split, factors, cfg.strength_factors,
                seed, texts, cfg.n_sentences, cfg.steer, cfg.sentence_marks, cfg.layer_ranges,
                cfg.steer_marks,
            )
        )  # fmt: skip
    if "concept" in asked:
        cs = concepts or concept_set(cfg, lm, mapper, d_model)
        tokenizer = lm.tokenizer if lm is not None else load_tokenizer(cfg.model)
        rows = range(cs.n_train) if train else range(cs.n_train, len(cs.vectors))
        layer = cs.layer if cs.layer is not None else default_concept_layer(n_layers)
        start, end = max(0, layer - 2), layer + 1
        parts.append(
            concept_choice_trials(
                cs.names, single_token_rows(tokenizer, cs.names, rows), n_per_question,
                cfg.n_choices, (start, end), cfg.concept_factor * float(np.mean(norms[start:end])),
                texts["sentences"][0 if train else 1 :: 2], cfg.n_sentences, split, seed,
                vector_offset=len(vs.vectors),
            )
        )  # fmt: skip
        vectors = torch.cat([vs.vectors, cs.vectors.to(vs.vectors.dtype)])
    trials = pd.concat(parts, ignore_index=True)
    # concept trials show their sentences plain
    trials["marks"] = trials.get("marks", pd.Series("none", index=trials.index)).fillna("none")
    trials["steer_marks"] = trials.get("steer_marks", pd.Series(False, index=trials.index)).eq(True)
    return trials, vectors


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

    if norms is None:
        texts = read_resource("localization.json")
        norms = model_call(cfg, lm, mapper, base_residual_norms, prompts=norm_contexts(texts))
    trials, vectors = trial_set(cfg, lm, mapper, norms, "eval", cfg.n_per_question, cfg.seed)
    scores = suite_mapper(cfg, lm, mapper, progress)(
        score_localization,
        trials,
        vectors=vectors,
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
        summary_markdown(
            per_question,
            title,
            f"{cfg.n_per_question} trials per question, {cfg.n_sentences} sentences per message. ",
        )
        + "\n![B7 accuracy and confusion matrices](localization.png)\n"
    )
    tables = {"results.parquet": results}
    return finish(cfg, out_dir, {"questions": per_question}, summary, tables)
