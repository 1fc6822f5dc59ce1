"""B5 self-calibration: does the model know the distribution of its own answers?

Per prompt (``resources/evals/calibration.json``): ``n_samples`` answers at temperature 1 give the
empirical distribution P over normalised answers; the model is then asked (greedily) for its
``k`` most likely answers with probabilities, parsed into the reported distribution R.

Score: KL(P ‖ Q) in nats, where Q is R made comparable with P. Smoothing, stated once: R is
normalised to sum 1; over the union U of sampled and reported answers,
``Q(a) = (R(a) + ε) / (1 + ε·|U|)`` (R(a) = 0 for answers the model did not name), ε = 0.01 by
default. Reference: the same KL for a report that names the same answers with equal
probabilities (does the model's numbers beat ignoring them?). A report that cannot be parsed is a
parse failure: counted, and left out of the KL means.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pandas as pd
from pydantic import Field

from introspect.config import parse, with_system
from introspect.errors import IntrospectError
from introspect.evals.common import (
    FullRun,
    ModelConfig,
    Progress,
    bar_chart,
    chat_ids,
    finish,
    fmt_mean,
    fmt_rate,
    mean_ci,
    model_label,
    rate,
    read_json,
    read_resource,
    row_seed,
    suite_mapper,
)
from introspect.evals.generation import MaxNewTokens, Sampling, generate
from introspect.io import markdown_table
from introspect.models import LoadedModel

_EDGE = " \t\"'`*“”‘’.,;:!?()[]{}<>-–—"
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


class CalibrationConfig(FullRun, ModelConfig):
    """B5: does the model know the distribution of its own answers (KL of report vs samples)?"""

    FULL: ClassVar[dict] = {"n_prompts": None, "n_samples": 50, "k": 5}

    prompts: str | None = Field(
        None,
        description="JSON prompt file like resources/evals/calibration.json "
        "(default: the shipped prompts)",
    )
    n_prompts: int | None = Field(6, ge=1, description="only the first N prompts (None: all)")
    n_samples: int = Field(10, ge=1, description="answers sampled per prompt (temperature 1)")
    k: int = Field(3, ge=1, description="answers the model is asked to report, with probabilities")
    answer_tokens: MaxNewTokens = Field(8, description="most tokens per sampled answer")
    report_tokens: MaxNewTokens = Field(64, description="most tokens of the (greedy) report")
    epsilon: float = Field(
        0.01, gt=0, description="additive smoothing of the reported distribution (KL needs Q > 0)"
    )
    seed: int = Field(0, description="sampling seed (each sample's seed is derived from it)")
    batch_size: int = Field(32, ge=1, description="prompts generated together")


# --------------------------------------------------------------------------- parsing


def normalise_answer(text: str) -> str:
    """First line, lower-cased, edge punctuation and a leading article dropped."""
    line = text.strip().split("\n", 1)[0].lower().strip(_EDGE)
    return " ".join(_ARTICLE.sub("", line).split())


_BULLET = re.compile(r"^\s*(?:[-*•+]|\(?\d+[.)]|\(?[a-z][.)])\s+")
_PROB = re.compile(
    r"(?P<num>\d+(?:\.\d+)?)\s*(?:/|out of)\s*(?P<den>\d+(?:\.\d+)?)"  # fraction 1/4, 3 out of 10
    r"|(?P<pct>\d+(?:\.\d+)?)\s*%"  # percentage 40 %
    r"|(?P<dec>(?<![\d.])\d*\.\d+|(?<![\d.])[01](?![\d.]))"  # decimal .4, 0.4, 0, 1
    r"|(?P<int>(?<![\d.])\d{1,3}(?![\d.]))"  # bare number (a percentage when > 1)
)
_JOINERS = re.compile(r"(?:[:=\-–—(,]|\bwith\b|\bprobability\b|\bchance\b|\bof\b|\s)+$")


def _value(m: re.Match) -> float:
    if m.group("num") is not None:
        den = float(m.group("den"))
        return float(m.group("num")) / den if den else math.nan
    if m.group("pct") is not None:
        return float(m.group("pct")) / 100
    if m.group("dec") is not None:
        return float(m.group("dec"))
    v = float(m.group("int"))
    return v / 100 if v > 1 else v


def _from_json(text: str) -> dict[str, float] | None:
    m = re.search(r"\{.*\}|\[.*\]", text, re.S)
    if m is None:
        return None
    try:
        data = json.loads(m.group(0))
    except ValueError:
        return None
    pairs = []
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                ans = item.get("answer", item.get("name"))
                p = item.get("probability", item.get("p", item.get("prob")))
                pairs.append((ans, p))
    out: dict[str, float] = {}
    for ans, p in pairs:
        if isinstance(p, str):
            pm = _PROB.search(p)
            p = _value(pm) if pm else None
        if isinstance(ans, str) and isinstance(p, int | float) and not isinstance(p, bool):
            p = p / 100 if p > 1 else float(p)
            out[normalise_answer(ans)] = out.get(normalise_answer(ans), 0.0) + p
    return out or None


def parse_report(text: str) -> dict[str, float] | None:
    """Reported answers → probabilities, or None when nothing usable is found.

    Reads JSON-ish objects/lists, and otherwise lines (bullets and numbering stripped, several
    'answer (p)' items on one line split at ';' or ','), each an answer followed by its
    probability: a percentage, a decimal, a fraction ('1/4', '3 out of 10'), or a bare number
    right after a separator at the end ('blue: 40'; a percentage when > 1). Repeated answers add
    up. Any value outside [0, 1] or a total of 0
    makes the report unusable.
    """
    found = _from_json(text)
    if found is None:
        found = {}
        for raw in text.splitlines():
            line = _BULLET.sub("", raw.strip())
            parts = re.split(r"[;,]\s*", line) if len(_PROB.findall(line)) > 1 else [line]
            for part in parts:
                matches = list(_PROB.finditer(part))
                if not matches:
                    continue
                m = matches[-1]  # the probability comes after the answer
                if m.group("int") is not None and not (
                    re.search(r"[:=(\-–—]\s*$", part[: m.start()])
                    and re.fullmatch(r"[\s).]*", part[m.end() :])
                ):
                    continue  # a bare number counts only as 'answer: N' ("3 times" does not)
                answer = normalise_answer(_JOINERS.sub("", part[: m.start()]))
                if answer:
                    found[answer] = found.get(answer, 0.0) + _value(m)
    if not found:
        return None
    values = list(found.values())
    if any(not 0 <= v <= 1 for v in values) or sum(values) <= 0:
        return None
    return found


# --------------------------------------------------------------------------- scoring


def kl_divergence(
    sampled: dict[str, float], reported: dict[str, float], epsilon: float = 0.01
) -> float:
    """KL(P ‖ Q) in nats with the smoothing in the module docstring (P from counts or rates)."""
    total_p = sum(sampled.values())
    total_r = sum(reported.values())
    if total_p <= 0 or total_r <= 0:
        raise IntrospectError("kl_divergence: both distributions need positive mass")
    union = set(sampled) | set(reported)
    denom = 1 + epsilon * len(union)
    kl = 0.0
    for a in union:
        p = sampled.get(a, 0.0) / total_p
        if p > 0:
            q = (reported.get(a, 0.0) / total_r + epsilon) / denom
            kl += p * math.log(p / q)
    return kl


def calibration_trials(data: dict | None = None, n_prompts: int | None = None, k: int = 3):
    """One row per prompt: ``key``, ``prompt``, ``report_question``."""
    data = data or read_resource("calibration.json")
    prompts, template = data.get("prompts"), data.get("report_template")
    if not isinstance(prompts, list) or not prompts or not isinstance(template, str):
        raise IntrospectError("prompts: need a list 'prompts' and a string 'report_template'")
    if "{prompt}" not in template:
        raise IntrospectError("prompts: 'report_template' must contain {prompt}")
    prompts = prompts[:n_prompts] if n_prompts else prompts
    return pd.DataFrame(
        {
            "key": [f"p{i}" for i in range(len(prompts))],
            "prompt": prompts,
            "report_question": [template.format(prompt=p, k=k) for p in prompts],
        }
    )


def sample_and_report(
    lm: LoadedModel,
    shard: pd.DataFrame,
    n_samples: int = 10,
    answer_tokens: int = 8,
    report_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``samples`` (list of raw answers, temperature 1), ``report``
    (greedy)."""
    tok = lm.tokenizer
    prompts, seeds = [], []
    for key, p in zip(shard["key"], shard["prompt"], strict=True):
        ids = chat_ids(tok, with_system([{"role": "user", "content": p}], system_prompt))
        prompts += [ids] * n_samples
        seeds += [row_seed(seed, f"{key}:{j}") for j in range(n_samples)]
    sampled = Sampling(max_new_tokens=answer_tokens, temperature=1.0, top_p=1.0)
    texts = generate(lm, prompts, sampled, seeds, batch_size=batch_size)
    reports = generate(
        lm,
        [
            chat_ids(tok, with_system([{"role": "user", "content": q}], system_prompt))
            for q in shard["report_question"]
        ],
        Sampling(max_new_tokens=report_tokens),
        batch_size=batch_size,
    )
    return pd.DataFrame(
        {
            "key": shard["key"].to_numpy(),
            "samples": [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(shard))],
            "report": reports,
        }
    )


def score_prompts(results: pd.DataFrame, epsilon: float = 0.01) -> pd.DataFrame:
    """Per prompt: the empirical and reported distributions, KL, the equal-report KL, whether
    the reported top answer is the sampled mode, and the sampled mass on named answers."""
    rows = []
    for r in results.itertuples():
        counts = Counter(normalise_answer(s) for s in r.samples)
        counts.pop("", None)
        reported = parse_report(r.report)
        row = {
            "key": r.key,
            "empirical": json.dumps(dict(counts.most_common())),
            "reported": json.dumps(reported),
            "parsed": reported is not None and bool(counts),
            "kl": math.nan,
            "kl_equal": math.nan,
            "top1_match": False,
            "coverage": math.nan,
        }
        if row["parsed"]:
            equal = dict.fromkeys(reported, 1.0)
            top = max(counts.values())
            row.update(
                kl=kl_divergence(counts, reported, epsilon),
                kl_equal=kl_divergence(counts, equal, epsilon),
                top1_match=counts.get(max(reported, key=reported.get), 0) == top,
                coverage=sum(counts.get(a, 0) for a in reported) / sum(counts.values()),
            )
        rows.append(row)
    return results.merge(pd.DataFrame(rows), on="key")


def calibration_metrics(scored: pd.DataFrame) -> dict:
    ok = scored[scored["parsed"]]
    return {
        "n_prompts": len(scored),
        "parse_failures": rate(int((~scored["parsed"]).sum()), len(scored)),
        "kl": mean_ci(ok["kl"].tolist() if len(ok) else []),
        "kl_equal_report": mean_ci(ok["kl_equal"].tolist() if len(ok) else []),
        "top1_match": rate(int(ok["top1_match"].sum()) if len(ok) else 0, len(ok)),
        "coverage": mean_ci(ok["coverage"].tolist() if len(ok) else []),
    }


def summary_markdown(metrics: dict, scored: pd.DataFrame, label: str, cfg) -> str:
    rows = []
    for r in scored.itertuples():
        emp = json.loads(r.empirical)
        rows.append(
            {
                "prompt": r.prompt,
                "sampled (top 3)": ", ".join(f"{a} {c}" for a, c in list(emp.items())[:3]),
                "reported": "parse failure"
                if not r.parsed
                else ", ".join(f"{a} {p:.2f}" for a, p in json.loads(r.reported).items()),
                "KL": f"{r.kl:.2f}" if r.parsed else "",
                "KL equal": f"{r.kl_equal:.2f}" if r.parsed else "",
            }
        )
    m = metrics
    verdict = (
        "The model's probabilities beat an equal-probability report of the same answers."
        if m["kl"]["n"] and m["kl"]["mean"] < m["kl_equal_report"]["mean"]
        else "The model's probabilities do not beat an equal-probability report of the same "
        "answers."
    )
    return (
        f"### B5 self-calibration: {label}\n\n"
        f"{m['n_prompts']} prompts, {cfg.n_samples} samples each at temperature 1; the model "
        f"reports its top {cfg.k} answers with probabilities (greedy). KL(P_actual ‖ "
        f"P_reported) in nats, with P_reported normalised to 1 and smoothed additively by "
        f"ε = {cfg.epsilon} over the union of sampled and reported answers, then renormalised. "
        "Intervals: bootstrap over prompts (means), Wilson (rates).\n\n"
        + markdown_table(
            [
                {"measure": "parse failures", "value": fmt_rate(m["parse_failures"])},
                {"measure": "mean KL (nats)", "value": fmt_mean(m["kl"])},
                {"measure": "mean KL, equal report", "value": fmt_mean(m["kl_equal_report"])},
                {"measure": "reported top-1 = sampled mode", "value": fmt_rate(m["top1_match"])},
                {"measure": "sampled mass on named answers", "value": fmt_mean(m["coverage"])},
            ],
            ["measure", "value"],
        )
        + "\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n{verdict}\n\n![B5 KL per prompt](calibration.png)\n"
    )


def run_calibration(
    config: CalibrationConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage: sample, ask for the report, parse, score, write files."""
    cfg = parse(CalibrationConfig, config)
    data = read_json(cfg.prompts, "prompts") if cfg.prompts else None
    trials = calibration_trials(data, cfg.n_prompts, cfg.k)
    raw = suite_mapper(cfg, lm, mapper, progress)(
        sample_and_report,
        trials,
        n_samples=cfg.n_samples,
        answer_tokens=cfg.answer_tokens,
        report_tokens=cfg.report_tokens,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        system_prompt=cfg.system_prompt,
    )
    scored = score_prompts(trials.merge(raw, on="key"), cfg.epsilon)
    metrics = calibration_metrics(scored)
    label = model_label(cfg)
    ok = scored[scored["parsed"]]
    top = max([1.0, *ok["kl"], *ok["kl_equal"]]) * 1.1
    bar_chart(
        [f"{k}: {p[:22]}" for k, p in zip(ok["key"], ok["prompt"], strict=True)],
        ok["kl"].tolist(),
        [[v, v] for v in ok["kl"]],
        Path(out_dir) / "calibration.png",
        title=f"B5: KL(P_actual ‖ P_reported) per parsed prompt (dots: equal report), {label}",
        ylabel="KL (nats)",
        points=[[v] for v in ok["kl_equal"]],
        ylim=(0.0, top),
    )
    table = scored.assign(samples=scored["samples"].map(json.dumps))
    summary = summary_markdown(metrics, scored, label, cfg)
    return finish(cfg, out_dir, metrics, summary, {"results.parquet": table})
