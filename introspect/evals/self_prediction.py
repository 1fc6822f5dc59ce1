"""B4 self-prediction (Binder et al. 2024, "Looking Inward"), on the ``dataset_release`` format.

Each JSONL row has an ``object_level_prompt`` (chat messages), a ``hypothetical_prompt`` asking
for a property of the answer the model would give, the ``behavioral_property`` and, for ethical
tasks, ``option_matching_ethical_stance``. The model answers both greedily; the property of its
own object-level answer is the target, its hypothetical answer the prediction. The baseline
always guesses the task's most common object-level property value.

By default B4 reads the small sample shipped in ``introspect/resources/evals/self_prediction/``
(23 tasks in this format, our own word lists, sentences and quiz questions, written by
``scripts/make_b4_sample.py``), so that it runs on a fresh clone. Binder et al.'s real test set
is passed with ``binder_dir`` (``--binder-dir`` on the CLI), e.g. ``../shared/data/binder_test``.

Property rules (lower-cased; the text stripped of surrounding whitespace and quotes):

* ``first/second/third_character`` - that character of the object-level answer; the prediction is
  the first character of the hypothetical answer.
* ``first/second/third_word`` - that word (split on whitespace, punctuation stripped from the
  word's ends); the prediction is the first word of the hypothetical answer.
* ``starts_with_vowel`` - "true"/"false": is the answer's first letter one of a, e, i, o, u.
* ``among_a_or_c`` / ``among_b_or_d`` - "true"/"false": is the first stand-alone option letter
  A-D of the answer among the two.
* any other property with ``option_matching_ethical_stance`` - "true"/"false": is the answer's
  option letter that option.

True/false predictions take the first "true"/"false" (or "yes"/"no") in the hypothetical answer.
An object-level answer without the property (too few words, no option letter) leaves its row out
and is counted; a prediction that cannot be read counts as wrong.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from introspect.errors import IntrospectError
from introspect.evals.common import (
    chat_ids,
    fmt_rate,
    in_process,
    load_model,
    markdown_table,
    model_label,
    parse_config,
    positive,
    rate,
    write_outputs,
)
from introspect.evals.generation import Sampling, generate
from introspect.models import LoadedModel

# The shipped sample (a plain directory: the package is installed unzipped).
DEFAULT_BINDER_DIR = Path(
    str(resources.files("introspect") / "resources" / "evals" / "self_prediction")
)
FIELDS = ("object_level_prompt", "hypothetical_prompt", "behavioral_property")
NTH = {"first": 0, "second": 1, "third": 2}
BOOLEAN = ("starts_with_vowel", "among_a_or_c", "among_b_or_d")
# New tokens for the object-level answer: enough to hold the property (the rest is not read).
OBJECT_TOKENS = {"character": 8, "first_word": 12, "second_word": 18, "third_word": 24}
FULL = {"n_per_task": 100}


@dataclass
class SelfPredictionConfig:
    model: str = "smollm2-135m"
    adapter: str | None = None
    label: str | None = None  # the name shown in reports; default: model + adapter
    device: str | None = None
    dtype: str | None = None
    # dataset_release JSONL dir; None = the shipped sample. The real Binder et al. test set:
    # binder_dir=../shared/data/binder_test (--binder-dir).
    binder_dir: str | None = None
    n_per_task: int = 2
    tasks: list[str] | None = None  # file stems; all files when None
    seed: int = 0
    batch_size: int = 32

    def validate(self) -> None:
        positive(self, "n_per_task", "batch_size")


def binder_dir(path: str | os.PathLike | None) -> Path:
    """The directory of ``dataset_release`` JSONL files: the given one, or the shipped sample."""
    d = Path(path) if path else DEFAULT_BINDER_DIR
    if not d.is_dir() or not any(d.glob("*.jsonl")):
        raise IntrospectError(
            f"binder_dir: {d} holds no .jsonl files; pass the directory of Binder et al.'s "
            "dataset_release test files (--binder-dir)"
        )
    return d


def read_task(path: Path) -> list[dict]:
    """Rows of one ``dataset_release`` file, checked for the fields B4 reads."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise IntrospectError(
                f"binder_dir: {path.name} line {n} is not JSON ({e.msg})"
            ) from None
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise IntrospectError(f"binder_dir: {path.name} line {n} lacks field '{missing[0]}'")
        prop = row["behavioral_property"]
        if not _known(prop) and row.get("option_matching_ethical_stance") is None:
            raise IntrospectError(
                f"binder_dir: {path.name} line {n}: unknown behavioral_property {prop!r}"
            )
        rows.append(row)
    if not rows:
        raise IntrospectError(f"binder_dir: {path.name} has no rows")
    return rows


def _known(prop: str) -> bool:
    kind = prop.split("_", 1)
    return prop in BOOLEAN or (kind[0] in NTH and kind[-1] in ("character", "word"))


def self_prediction_trials(
    directory: str | os.PathLike | None,
    n_per_task: int = 2,
    seed: int = 0,
    tasks: list[str] | None = None,
) -> pd.DataFrame:
    """``n_per_task`` seeded rows of every task file: ``key`` (task:line), ``task``,
    ``property``, ``ethical_option``, and the two prompts as JSON message lists."""
    d = binder_dir(directory)
    paths = sorted(d.glob("*.jsonl"))
    if tasks:
        unknown = sorted(set(tasks) - {p.stem for p in paths})
        if unknown:
            raise IntrospectError(f"tasks: {unknown[0]!r} is not a file in {d}")
        paths = [p for p in paths if p.stem in tasks]
    out = []
    for path in paths:
        rows = read_task(path)
        rng = np.random.default_rng([seed, *path.stem.encode()])
        picks = sorted(rng.choice(len(rows), size=min(n_per_task, len(rows)), replace=False))
        for i in picks:
            r = rows[i]
            out.append(
                {
                    "key": f"{path.stem}:{i}",
                    "task": path.stem,
                    "property": r["behavioral_property"],
                    "ethical_option": r.get("option_matching_ethical_stance"),
                    "object_prompt": json.dumps(r["object_level_prompt"]),
                    "hypothetical_prompt": json.dumps(r["hypothetical_prompt"]),
                }
            )
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- properties

_EDGE = " \t\n\"'`*“”‘’.,;:!?()[]"


def _clean(text: str) -> str:
    return text.strip().strip(_EDGE).lower()


def _words(text: str) -> list[str]:
    return [w for w in (t.strip(_EDGE) for t in text.lower().split()) if w]


def _letter(text: str) -> str | None:
    m = re.search(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text)
    return m.group(1) if m else None


def object_property(response: str, prop: str, ethical_option: str | None = None) -> str | None:
    """The property of an object-level answer (None when the answer does not have it)."""
    if prop in ("among_a_or_c", "among_b_or_d") or not _known(prop):
        letter = _letter(response)
        if letter is None:
            return None
        if prop == "among_a_or_c":
            return str(letter in "AC").lower()
        if prop == "among_b_or_d":
            return str(letter in "BD").lower()
        return str(letter == str(ethical_option).strip().upper()).lower()
    if prop == "starts_with_vowel":
        letters = [c for c in response.lower() if c.isalpha()]
        return str(letters[0] in "aeiou").lower() if letters else None
    nth, kind = prop.split("_", 1)
    i = NTH[nth]
    if kind == "character":
        text = _clean(response)
        return text[i] if len(text) > i else None
    words = _words(response)
    return words[i] if len(words) > i else None


def predicted_property(response: str, prop: str) -> str | None:
    """The value a hypothetical answer states (None when it states none)."""
    if prop.endswith("_character"):
        text = _clean(response)
        return text[0] if text else None
    if prop.endswith("_word") and _known(prop):
        words = _words(response)
        return words[0] if words else None
    m = re.search(r"\b(true|false|yes|no)\b", response.lower())
    if m is None:
        return None
    return {"yes": "true", "no": "false"}.get(m.group(1), m.group(1))


# --------------------------------------------------------------------------- model calls


def _object_tokens(prop: str) -> int:
    return OBJECT_TOKENS.get(prop, OBJECT_TOKENS["character"] if "word" not in prop else 24)


def answer_self_prediction(
    lm: LoadedModel, shard: pd.DataFrame, batch_size: int = 32
) -> pd.DataFrame:
    """Per-shard function: greedy ``object_response`` and ``hypothetical_response`` per key.

    Answers are only as long as the property needs (see OBJECT_TOKENS); grouping by that
    length keeps short tasks from waiting on long ones.
    """
    tok = lm.tokenizer
    obj = [""] * len(shard)
    budgets = [_object_tokens(p) for p in shard["property"]]
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        prompts = [chat_ids(tok, json.loads(shard["object_prompt"].iloc[i])) for i in idx]
        texts = generate(lm, prompts, Sampling(budget), batch_size=batch_size)
        for i, t in zip(idx, texts, strict=True):
            obj[i] = t
    prompts = [chat_ids(tok, json.loads(m)) for m in shard["hypothetical_prompt"]]
    hyp = generate(lm, prompts, Sampling(6), batch_size=batch_size)
    return pd.DataFrame(
        {"key": shard["key"].to_numpy(), "object_response": obj, "hypothetical_response": hyp}
    )


# --------------------------------------------------------------------------- metrics


def score_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Add ``target`` (property of the own answer), ``prediction`` and ``correct``."""
    df = results.copy()
    df["target"] = [
        object_property(r, p, e)
        for r, p, e in zip(df.object_response, df.property, df.ethical_option, strict=True)
    ]
    df["prediction"] = [
        predicted_property(r, p) for r, p in zip(df.hypothetical_response, df.property, strict=True)
    ]
    df["correct"] = df["target"].notna() & (df["prediction"] == df["target"])
    return df


def self_prediction_metrics(scored: pd.DataFrame) -> dict:
    """Per task and pooled: accuracy vs the most-common-answer baseline, Wilson intervals."""
    tasks = []
    total = {"correct": 0, "mode": 0, "n": 0}
    for task, df in scored.groupby("task", sort=True):
        ok = df[df["target"].notna()]
        counts = Counter(ok["target"])
        mode, mode_n = counts.most_common(1)[0] if counts else (None, 0)
        correct = int(ok["correct"].sum())
        tasks.append(
            {
                "task": task,
                "property": df["property"].iloc[0],
                "n": len(ok),
                "n_excluded": len(df) - len(ok),
                "n_unreadable_predictions": int(ok["prediction"].isna().sum()),
                "accuracy": rate(correct, len(ok)),
                "baseline": rate(mode_n, len(ok)),
                "most_common": mode,
            }
        )
        total["correct"] += correct
        total["mode"] += mode_n
        total["n"] += len(ok)
    return {
        "tasks": tasks,
        "overall": {
            "accuracy": rate(total["correct"], total["n"]),
            "baseline": rate(total["mode"], total["n"]),
        },
    }


def summary_markdown(metrics: dict, label: str, n_per_task: int) -> str:
    rows = [
        {
            "task": t["task"],
            "n (excluded)": f"{t['n']} ({t['n_excluded']})",
            "accuracy [95% CI]": fmt_rate(t["accuracy"]),
            "baseline [95% CI]": fmt_rate(t["baseline"]),
            "most common": repr(t["most_common"]) if t["most_common"] is not None else "",
        }
        for t in metrics["tasks"]
    ]
    o = metrics["overall"]
    above = [
        t["task"]
        for t in metrics["tasks"]
        if t["n"] and t["accuracy"]["ci"][0] > t["baseline"]["rate"]
    ]
    verdict = (
        f"Pooled over tasks: accuracy {fmt_rate(o['accuracy'])} against the baseline "
        f"{fmt_rate(o['baseline'])}. "
        + (
            f"Tasks whose interval lies above their baseline: {', '.join(above)}."
            if above
            else "No task's accuracy interval lies above its baseline."
        )
    )
    return (
        f"### B4 self-prediction (Binder et al.): {label}\n\n"
        f"{n_per_task} rows per task, greedy decoding. Accuracy = the hypothetical answer equals "
        "the property of the model's own object-level answer; baseline = always the task's most "
        "common property value. Wilson 95 % intervals; rows whose own answer lacks the property "
        "are excluded (in brackets).\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n{verdict}\n\n![B4 accuracy vs baseline per task](self_prediction.png)\n"
    )


def plot(metrics: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics["tasks"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    x = np.arange(len(tasks))
    for offset, key, colour in ((-0.2, "accuracy", "C0"), (0.2, "baseline", "C7")):
        vals = np.array([t[key]["rate"] for t in tasks], dtype=float)
        lo = np.array([t[key]["ci"][0] for t in tasks], dtype=float)
        hi = np.array([t[key]["ci"][1] for t in tasks], dtype=float)
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))
        ax.bar(x + offset, vals, 0.4, yerr=err, capsize=2, color=colour, label=key)
    ax.set_xticks(x, [t["task"] for t in tasks], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of rows")
    ax.set_title(f"B4 self-prediction: accuracy vs most-common baseline (95% CI), {label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_self_prediction(
    config: dict, out_dir: str | os.PathLike, lm: LoadedModel | None = None, mapper=None
) -> dict:
    """Plan stage: answer both prompts per row, score, write results, metrics and summary.

    ``mapper`` as in :func:`introspect.evals.behavioral.run_behavioral`."""
    cfg = parse_config(SelfPredictionConfig, config, FULL)
    trials = self_prediction_trials(cfg.binder_dir, cfg.n_per_task, cfg.seed, cfg.tasks)
    mapper = mapper or in_process(lm or load_model(cfg))
    answers = mapper(answer_self_prediction, trials, batch_size=cfg.batch_size)
    results = trials.merge(answers, on="key")
    scored = score_rows(results)
    metrics = self_prediction_metrics(scored)
    label = model_label(cfg)
    metrics.update(config=asdict(cfg), label=label, n_tasks=len(metrics["tasks"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(metrics, out / "self_prediction.png", label)
    table = scored.drop(columns=["object_prompt", "hypothetical_prompt"])
    return write_outputs(
        out, metrics, summary_markdown(metrics, label, cfg.n_per_task), {"results.parquet": table}
    )
