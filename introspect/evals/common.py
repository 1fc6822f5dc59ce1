"""Pieces shared by the B2–B7 evaluations: configs, chat prompts, generation, scoring, files.

Every evaluation has the same shape, so that it runs in one process or fanned out over model
hosts: (a) a trials table with a unique ``key`` column, (b) a per-shard function
``fn(lm, shard_df, **opts) -> results_df`` keyed the same way, (c) metrics from the merged
results. This module holds what (a)–(c) need more than once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from introspect.detection import PREFILL, DetectionPrompt, answer_token_ids, collate
from introspect.detection import detection_logits as _detection_logits
from introspect.errors import IntrospectError
from introspect.models import LoadedModel

# --------------------------------------------------------------------------- configs


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint (int, float, str, bool, list[...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # Any


def parse_config(cls, config: dict | None, full: dict | None = None):
    """Build the dataclass ``cls`` from a plan's config dict, naming the field on bad input.

    ``full`` holds the values of a real run: with ``full: true`` in ``config`` they replace the
    quick defaults, and anything the config sets explicitly still wins.
    """
    config = dict(config or {})
    if not isinstance(config.get("full", False), bool):
        raise IntrospectError(f"full: {config['full']!r} must be true or false")
    if config.pop("full", False):
        config = {**(full or {}), **config}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in config.items():
        if key not in hints:
            raise IntrospectError(f"{key}: unknown option (known: {', '.join(known)}, full)")
        if not _type_ok(value, hints[key]):
            raise IntrospectError(
                f"{key}: {value!r} is not a valid {getattr(hints[key], '__name__', hints[key])}"
            )
    out = cls(**config)
    if hasattr(out, "validate"):
        out.validate()
    return out


def positive(config, *names: str) -> None:
    """Raise naming the first field among ``names`` that is not >= 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise IntrospectError(f"{name}: {getattr(config, name)} must be >= 1")


def load_model(config) -> LoadedModel:
    """The model a config names: ``model`` plus ``adapter`` (a run dir, adapter dir, fully
    fine-tuned model dir or mid-run checkpoint), on ``device`` in ``dtype``."""
    from introspect import models

    return models.load_evaluated(
        config.model,
        config.adapter,
        getattr(config, "dtype", None),
        device=getattr(config, "device", None),
    )


def read_resource(name: str) -> dict:
    """A JSON data file shipped in ``introspect/resources/evals/``."""
    return read_json(resources.files("introspect") / "resources" / "evals" / name, name)


def read_json(path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IntrospectError(f"{what}: {path} is not a readable JSON file ({e})") from None


def row_seed(seed: int, key: str) -> int:
    """A per-row seed from the run's seed and the row's key: the same row samples the same text
    whichever shard or batch it lands in."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def model_label(cfg) -> str:
    """The name a summary shows for the evaluated model: ``cfg.label``, else model + adapter."""
    return cfg.label or cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")


def in_process(lm: LoadedModel):
    """The default mapper: ``mapper(fn, rows, **opts)`` runs a per-shard function on all rows
    in this process. A plan runner passes its own mapper to fan the rows out over model hosts
    (it must return the rows' results keyed by ``key``)."""

    def mapper(fn, rows: pd.DataFrame, **opts) -> pd.DataFrame:
        return fn(lm, rows, **opts)

    return mapper


# --------------------------------------------------------------------------- prompts


def chat_ids(
    tokenizer,
    messages: list[dict],
    prefill: str | None = None,
) -> list[int]:
    """Token ids of a conversation ready for the assistant to speak (optionally prefilled)."""
    if prefill is None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": prefill}],
            tokenize=False,
            continue_final_message=True,
        )
    return tokenizer.encode(text, add_special_tokens=False)


def question_prompt(
    tokenizer,
    question: str,
    answer_tokens: Sequence[str],
    system_prompt: str | None = None,
    prefill: str = PREFILL,
) -> DetectionPrompt:
    """An unsteered multiple-choice prompt: ``[system?, user: question, assistant: prefill]``.

    Split like a detection prompt (prefix = the user turn, suffix = the prefilled assistant
    turn) so it is scored by the same batched two-pass code.
    """
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    msgs.append({"role": "user", "content": question})
    prefix_text = tokenizer.apply_chat_template(msgs, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": prefill}],
        tokenize=False,
        continue_final_message=True,
    )
    if not full_text.startswith(prefix_text):
        raise IntrospectError("chat template: the prefilled answer does not extend the question")
    return DetectionPrompt(
        prefix_ids=tokenizer.encode(prefix_text, add_special_tokens=False),
        suffix_ids=tokenizer.encode(full_text[len(prefix_text) :], add_special_tokens=False),
        answer_ids=answer_ids(tokenizer, answer_tokens),
    )


def answer_ids(tokenizer, answer_tokens: Sequence[str]) -> tuple[int, ...]:
    """The single token id of each of K answers (detection's ``answer_token_ids`` returns only
    the first two, so multi-way prompts use this)."""
    ids = []
    for text in answer_tokens:
        ids.append(answer_token_ids(tokenizer, (text, text))[0])
    return tuple(ids)


# --------------------------------------------------------------------------- scoring


def choice_probabilities(logits: torch.Tensor, answer_ids: torch.Tensor):
    """``[B, K]`` softmax over each row's K answer-token logits, and their raw probability mass
    (a low mass says the prompt does not lead to any of the answers)."""
    logits = logits.float()
    probs = logits.gather(1, answer_ids).softmax(-1)
    mass = logits.log_softmax(-1).gather(1, answer_ids).exp().sum(-1)
    return probs, mass


@torch.no_grad()
def score_choices(
    lm: LoadedModel, prompts: Sequence[DetectionPrompt], batch_size: int = 16
) -> tuple[list[list[float]], list[float]]:
    """K-way answer probabilities of (steered) prompts, in input order; K may vary by row.

    Rows are grouped by K and length (batches hold one K; padding changes no row's answer).
    """
    probs: list[list[float]] = [[] for _ in prompts]
    mass = [0.0] * len(prompts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = sorted(
        range(len(prompts)),
        key=lambda i: (len(prompts[i].answer_ids), len(prompts[i].prefix_ids)),
    )
    batches: list[list[int]] = []
    for i in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and len(prompts[batches[-1][0]].answer_ids) == len(prompts[i].answer_ids)
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    for idx in batches:
        batch = collate([prompts[i] for i in idx], pad).to(lm.device)
        p, m = choice_probabilities(_detection_logits(lm.model, batch), batch.answer_ids)
        for j, i in enumerate(idx):
            probs[i], mass[i] = p[j].tolist(), float(m[j])
    return probs, mass


# --------------------------------------------------------------------------- metrics and files


def rate(successes: int, n: int) -> dict:
    """``{"rate", "successes", "n", "ci"}`` with the Wilson 95 % interval."""
    from introspect.metrics import wilson_interval

    lo, hi = wilson_interval(int(successes), int(n))
    return {
        "rate": successes / n if n else math.nan,
        "successes": int(successes),
        "n": int(n),
        "ci": [lo, hi],
    }


def fmt_rate(r: dict, digits: int = 2) -> str:
    """``0.53 [0.41, 0.65]`` (n/a when there were no trials)."""
    if not r["n"]:
        return "n/a"
    return f"{r['rate']:.{digits}f} [{r['ci'][0]:.{digits}f}, {r['ci'][1]:.{digits}f}]"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns, in order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(
    out_dir: str | os.PathLike,
    metrics: dict,
    summary: str,
    tables: dict[str, pd.DataFrame] | None = None,
) -> dict:
    """The stage contract: ``metrics.json``, ``summary.md`` and tables (parquet / jsonl) in
    ``out_dir``. Returns ``metrics``."""
    out = Path(out_dir)
    for name, df in (tables or {}).items():
        if name.endswith(".jsonl"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict("records"))
            atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
        else:
            atomic_write(out / name, lambda tmp, df=df: df.to_parquet(tmp, index=False))
    text = json.dumps(metrics, indent=2, default=_json_default)
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(summary))
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return json.loads(text)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean with a percentile-bootstrap 95 % interval over the items (nan interval if n < 2)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": math.nan, "n": 0, "ci": [math.nan, math.nan]}
    if x.size < 2:
        return {"mean": float(x.mean()), "n": 1, "ci": [math.nan, math.nan]}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean": float(x.mean()), "n": int(x.size), "ci": [float(lo), float(hi)]}


def fmt_mean(m: dict, digits: int = 3) -> str:
    if not m["n"]:
        return "n/a"
    if not math.isfinite(m["ci"][0]):
        return f"{m['mean']:.{digits}f}"
    return f"{m['mean']:.{digits}f} [{m['ci'][0]:.{digits}f}, {m['ci'][1]:.{digits}f}]"


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    cis: Sequence[Sequence[float]],
    path: str | os.PathLike,
    title: str,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
    points: Sequence[Sequence[float]] | None = None,
    ylim: tuple[float, float] = (0.0, 1.0),
) -> None:
    """Bars with 95 % interval whiskers (and optional per-item dots and a reference line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2.5), 4.2))
    x = np.arange(len(labels))
    vals = np.asarray(values, dtype=float)
    lo = np.array([c[0] for c in cis], dtype=float)
    hi = np.array([c[1] for c in cis], dtype=float)
    err = np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))
    ax.bar(x, vals, color="C0", alpha=0.75, yerr=err, capsize=4)
    if points is not None:
        for i, ys in enumerate(points):
            jitter = np.linspace(-0.25, 0.25, len(ys)) if len(ys) > 1 else [0.0]
            ax.scatter(i + np.asarray(jitter), ys, s=9, color="k", alpha=0.5, zorder=3)
    if reference is not None:
        ax.axhline(reference, color="C3", ls="--", lw=1, label=reference_label or None)
        if reference_label:
            ax.legend(fontsize=8)
    ax.set_xticks(x, [str(s).replace("_", " ") for s in labels], rotation=25, ha="right")
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
