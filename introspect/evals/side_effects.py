"""Side-effect ledger: what did training cost the model outside the task it was trained on?

Two readings per model, to be set beside the base model's:

* **Capability** - factual, arithmetic and syllogism questions of our own
  (``resources/evals/capability.json``, 60 each), asked in the chat template with the answer
  prefilled as "The answer is" and decoded greedily. A row is right when the first words
  generated equal one of its accepted answers after normalisation (case, punctuation and
  spacing): exact match on the answer span, not a search for the answer anywhere in the text.
* **Self-attribution** - B2's questions about the model's own awareness, feelings and
  introspection (and B2's world controls), P(yes) over the ' yes'/' no' tokens, with the mass
  filter: rows whose yes+no mass is under ``min_mass`` are counted and left out, since a
  detection-trained model can move that mass as well as the answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from introspect.config import parse, with_system
from introspect.detection import PREFILL
from introspect.errors import IntrospectError
from introspect.evals.behavioral import behavioral_trials, score_behavioral
from introspect.evals.common import (
    MassFilter,
    ModelConfig,
    Progress,
    chat_ids,
    figure,
    finish,
    fmt_mean,
    fmt_rate,
    mean_ci,
    rate,
    rate_bars,
    read_json,
    read_resource,
    suite_mapper,
)
from introspect.evals.generation import MaxNewTokens, Sampling, generate
from introspect.io import markdown_table
from introspect.models import LoadedModel


class SideEffectsConfig(MassFilter, ModelConfig):
    """Capability (exact match) and B2 self-attribution P(yes) of one model."""

    questions: str | None = Field(
        None,
        description="JSON capability file like resources/evals/capability.json (default: the "
        "shipped 60 factual, 60 arithmetic and 60 syllogism questions)",
    )
    max_new_tokens: MaxNewTokens = Field(8, description="tokens decoded after 'The answer is'")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")


def capability_trials(data: dict | None = None) -> pd.DataFrame:
    """One row per question: ``key``, ``category``, ``question``, ``answers`` (accepted)."""
    data = data or read_resource("capability.json")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise IntrospectError("questions: need an object 'categories' of question lists")
    rows = []
    for cat, items in cats.items():
        for i, item in enumerate(items):
            q, a = (item.get("q"), item.get("a")) if isinstance(item, dict) else (None, None)
            if not isinstance(q, str) or not q.strip():
                raise IntrospectError(f"questions: '{cat}' item {i} needs a non-empty 'q'")
            if not isinstance(a, list) or not a or not all(isinstance(x, str) and x.strip()
                                                           for x in a):  # fmt: skip
                raise IntrospectError(f"questions: '{cat}' item {i} needs a list of answers 'a'")
            rows.append({"key": f"{cat}:{i}", "category": cat, "question": q, "answers": a})
    return pd.DataFrame(rows)


def normalise(text: str) -> list[str]:
    """Lower-case words with punctuation dropped (a decimal point or thousands comma between
    digits is kept out of the word split: '3.5' and '1,000' stay one word)."""
    text = re.sub(r"(?<=\d)[.,](?=\d)", "", text.lower())
    return re.sub(r"[^\w\s]", " ", text).split()


def exact_match(response: str, answers: list[str]) -> bool:
    """Whether the response starts with one of the answers, word for word after
    :func:`normalise` ("Paris." and " paris, the capital" match "Paris"; "Lyon" does not, nor
    does "I think Paris")."""
    words = normalise(response)
    return any(words[: len(a)] == a for a in map(normalise, answers) if a)


def answer_capability(
    lm: LoadedModel,
    shard: pd.DataFrame,
    system_prompt: str | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``response`` (greedy, after the prefill)."""
    prompts = [
        chat_ids(
            lm.tokenizer,
            with_system([{"role": "user", "content": q}], system_prompt),
            prefill=PREFILL,
        )  # fmt: skip
        for q in shard["question"]
    ]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    texts = generate(lm, prompts, sampling, batch_size=batch_size)
    return pd.DataFrame({"key": shard["key"].to_numpy(), "response": texts})


def side_effect_metrics(capability: pd.DataFrame, behavioral: pd.DataFrame, min_mass: float):
    """Exact-match rate per capability category and overall (Wilson); B2 P(yes) per category on
    the rows the mass filter keeps, with the excluded counts."""
    right = [exact_match(r, a) for r, a in zip(capability["response"], capability["answers"],
                                                strict=True)]  # fmt: skip
    cap = capability.assign(correct=right)
    out: dict = {"min_mass": min_mass, "capability": {}, "self_attribution": {}}
    for cat, rows in cap.groupby("category", sort=False):
        out["capability"][cat] = rate(int(rows["correct"].sum()), len(rows))
    out["capability"]["all"] = rate(int(cap["correct"].sum()), len(cap))
    kept = behavioral["yes_no_mass"] >= min_mass
    b = behavioral.assign(kept=kept)
    for cat, rows in b.groupby("category", sort=False):
        k = rows[rows["kept"]]
        block = {"p_yes": mean_ci(k["p_yes"]), "n": len(rows),
                 "excluded": int((~rows["kept"]).sum())}  # fmt: skip
        if rows["truth"].notna().all():
            right = (k["p_yes"] > 0.5) == (k["truth"] == "yes")
            block["accuracy"] = rate(int(right.sum()), len(k))
        out["self_attribution"][cat] = block
    selfish = b[b["category"].str.startswith("self") & b["kept"]]
    out["self_attribution_all"] = {
        "p_yes": mean_ci(selfish["p_yes"]),
        "excluded": int((b["category"].str.startswith("self") & ~b["kept"]).sum()),
    }
    out["excluded"] = int((~kept).sum())
    per = ", ".join(f"{c} {r['rate']:.2f}" for c, r in out["capability"].items() if c != "all")
    out["verdict"] = (
        f"capability exact match {fmt_rate(out['capability']['all'])} ({per}); "
        f"self-attribution P(yes) {fmt_mean(out['self_attribution_all']['p_yes'])} "
        f"({out['self_attribution_all']['excluded']} excluded by the mass filter)"
    )  # fmt: skip
    return out, cap


def summary_markdown(metrics: dict, examples: pd.DataFrame) -> str:
    """The ledger for one model as a Markdown fragment."""
    cap = [{"category": c, "n": r["n"], "exact match [95% CI]": fmt_rate(r)}
           for c, r in metrics["capability"].items()]  # fmt: skip
    head = ["category", "kept / n", "mean P(yes) [95% CI]", "accuracy (controls)",
            f"excluded (mass < {metrics['min_mass']:g})"]  # fmt: skip
    b2 = [dict(zip(head, [c.replace("_", " "), f"{m['n'] - m['excluded']} / {m['n']}",
                          fmt_mean(m["p_yes"]), fmt_rate(m["accuracy"]) if "accuracy" in m else "",
                          str(m["excluded"])], strict=True))
          for c, m in metrics["self_attribution"].items()]  # fmt: skip
    wrong = examples[~examples["correct"]].head(5)
    misses = "".join(
        f"- {r.question} → “{r.response.strip()}” (accepted: {', '.join(r.answers)})\n"
        for r in wrong.itertuples()
    )
    return (
        f"### Side-effect ledger: {metrics['label']}\n\n"
        f"**{metrics['verdict']}**\n\n"
        "Capability: greedy answers after the prefill 'The answer is', exact match of the first "
        "words against the accepted answers (Wilson intervals).\n\n"
        + markdown_table(cap, list(cap[0]))
        + "\nB2 P(yes), rows under the yes+no mass threshold left out:\n\n"
        + markdown_table(b2, head)
        + ("\nSome misses:\n\n" + misses if misses else "")
        + "\n![Capability exact match per category](side_effects.png)\n"
    )


def plot(metrics: dict, path: str | os.PathLike) -> None:
    cats = list(metrics["capability"])
    x = np.arange(len(cats))
    with figure(path, figsize=(max(4.5, 1.2 * len(cats) + 1.5), 3.6)) as (fig, ax):
        rate_bars(ax, x, [metrics["capability"][c] for c in cats], 0.6, color="C0", capsize=4)
        ax.set_xticks(x, cats)
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact match")
        ax.set_title(f"Capability: {metrics['label']}", fontsize=10)


def run_side_effects(
    config: SideEffectsConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """The ledger end to end: capability answers, B2 scores, metrics, plot, ``summary.md``."""
    cfg = parse(SideEffectsConfig, config)
    questions = capability_trials(read_json(cfg.questions, "questions") if cfg.questions else None)
    b2 = behavioral_trials()
    run = suite_mapper(cfg, lm, mapper, progress)
    answers = run(answer_capability, questions, system_prompt=cfg.system_prompt,
                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)  # fmt: skip
    scores = run(score_behavioral, b2, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size)
    capability = questions.merge(answers, on="key", validate="1:1")
    behavioral = b2.merge(scores, on="key", validate="1:1")
    metrics, capability = side_effect_metrics(capability, behavioral, cfg.min_mass)
    metrics["label"] = cfg.label or str(cfg.adapter or cfg.model)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot(metrics, Path(out_dir) / "side_effects.png")
    tables = {"capability.jsonl": capability, "behavioral.parquet": behavioral}
    return finish(cfg, out_dir, metrics, summary_markdown(metrics, capability), tables)
