"""Pieces shared by the B2–B7 evaluations: configs, chat prompts, generation, scoring, files.

Every evaluation has the same shape, so that it runs in one process or fanned out over model
hosts: (a) a trials table with a unique ``key`` column, (b) a per-shard function
``fn(lm, shard_df, **opts) -> results_df`` keyed the same way, (c) metrics from the merged
results. ``run_<suite>(config, out_dir, *, lm, mapper, progress)`` runs (b) with
:func:`suite_mapper` and writes its files with :func:`finish`. This module holds what (a)–(c)
need more than once.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import Field

from introspect.config import Config, Precision, SystemPrompt, with_system
from introspect.detection import PREFILL, DetectionPrompt, answer_token_ids, collate
from introspect.detection import detection_logits as _detection_logits
from introspect.errors import IntrospectError
from introspect.io import atomic_write, write_text
from introspect.models import LoadedModel
from introspect.steering import Steering

Progress = Callable[[int, int], None]
"""``progress(done, total)``: how far a run is; called by the run functions (never required)."""

# --------------------------------------------------------------------------- configs


class ModelConfig(SystemPrompt, Precision):
    """The model under evaluation, as every suite names it (the base of their configs)."""

    model: str = Field(
        "smollm2-135m", min_length=1, description="base model: Hugging Face id, local dir or alias"
    )
    adapter: str | None = Field(
        None,
        description="the trained model to evaluate: a run dir, adapter dir, fully fine-tuned "
        "model dir or mid-run checkpoint (default: the base model itself)",
    )
    label: str | None = Field(
        None, description="the model's name in reports (default: model + adapter)"
    )
    device: str | None = Field(
        None, description="torch device, e.g. cuda:0 or cpu (default: the best available)"
    )


class MassFilter(Config):
    """The mass filter every yes/no table applies (one definition for all suites)."""

    min_mass: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="rows whose answer tokens' probability mass (P(' yes') + P(' no'), or of "
        "the pair or choices asked for) is under this are counted, reported and left out of "
        "every rate (0 keeps all rows)",
    )


class FullRun(Config):
    """The ``full`` switch of a config that has real-run sizes (its ``FULL``)."""

    full: bool = Field(False, description="the real-run sizes instead of the quick ones")


def load_model(config: ModelConfig) -> LoadedModel:
    """The model a config names: ``model`` plus ``adapter``, on ``device`` in ``dtype``."""
    from introspect.runs import load_evaluated

    return load_evaluated(config.model, config.adapter, config.dtype, device=config.device)


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


def in_process(lm: LoadedModel, progress: Progress | None = None):
    """The default mapper: ``mapper(fn, rows, **opts)`` runs a per-shard function on all rows
    in this process (calling ``progress(done, total)`` before and after). A plan runner passes
    its own mapper to fan the rows out over model hosts (it must return the rows' results keyed
    by ``key``)."""
    report = progress or (lambda done, total: None)

    def mapper(fn, rows: pd.DataFrame, **opts) -> pd.DataFrame:
        report(0, len(rows))
        out = fn(lm, rows, **opts)
        report(len(rows), len(rows))
        return out

    mapper.call = lambda fn, **opts: fn(lm, **opts)
    return mapper


def model_call(cfg: ModelConfig, lm, mapper, fn: Callable, **opts):
    """``fn(model, **opts)`` once, wherever the model is: ``lm`` when given, else on the
    mapper's model (``mapper.call``: a host of a pool), else on the model ``cfg`` names.

    So a suite run over a host pool measures norms or concept vectors on a host, which holds a
    device, instead of loading the model a second time in its own (driver) task."""
    if lm is not None:
        return fn(lm, **opts)
    call = getattr(mapper, "call", None)
    return call(fn, **opts) if callable(call) else fn(load_model(cfg), **opts)


def ran_on(lm) -> dict[str, str]:
    """``{"dtype", "device"}``: where ``lm``'s weights are, so a suite's numbers say what they ran
    in (its config's ``null`` means "the default where it ran")."""
    from introspect.precision import dtype_name

    return {"dtype": dtype_name(next(lm.model.parameters()).dtype), "device": str(lm.device)}


def model_dims(cfg: ModelConfig, lm) -> tuple[int, int]:
    """``(n_layers, d_model)`` of the evaluated model: from ``lm``, else from its config."""
    from introspect.models import dims

    return (lm.n_layers, lm.d_model) if lm is not None else dims(cfg.model)


def held_out_steering(cfg, lm, mapper):
    """What a control suite steers with: ``(n_layers, vectors, texts, magnitudes)`` - the
    vector file ``cfg.vectors`` (its held-out rows are used, see :func:`held_out_rows`), the
    shipped prompts, and the magnitudes per layer range (``cfg`` is a
    :class:`introspect.data.Magnitudes`; relative ones are measured where the model is)."""
    from introspect.activations import base_residual_norms
    from introspect.data import absolute_magnitudes, default_prompts
    from introspect.vectors import load_vectors

    n_layers, d_model = model_dims(cfg, lm)
    vs = load_vectors(cfg.vectors, d_model)
    texts = default_prompts()
    norms = None
    if cfg.magnitude_mode == "relative":
        norms = model_call(cfg, lm, mapper, base_residual_norms, prompts=texts["context_prompts"])
    return n_layers, vs, texts, absolute_magnitudes(cfg, n_layers, norms)


def held_out_rows(vs) -> range:
    """A vector set's held-out rows (``>= n_train``), or all rows when none are held out."""
    n = vs.vectors.shape[0]
    return range(vs.n_train, n) if vs.n_train < n else range(n)


def suite_mapper(cfg: ModelConfig, lm=None, mapper=None, progress=None):
    """The mapper a suite runs its per-shard function with: ``mapper`` when given, else
    :func:`in_process` on ``lm`` (loaded from ``cfg`` when not given) reporting to ``progress``."""
    return mapper or in_process(lm or load_model(cfg), progress)


# --------------------------------------------------------------------------- prompts


def chat_ids(tokenizer, messages: list[dict], prefill: str | None = None) -> list[int]:
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
    msgs = with_system([{"role": "user", "content": question}], system_prompt)
    prefix, suffix = split_chat(
        tokenizer,
        msgs,
        {"role": "assistant", "content": prefill},
        "the prefilled answer does not extend the question",
        continue_final_message=True,
    )
    return DetectionPrompt(prefix, suffix, answer_ids(tokenizer, answer_tokens))


def split_chat(
    tokenizer, prefix: list[dict], turn: dict, problem: str, **template
) -> tuple[list[int], list[int]]:
    """Token ids of the conversation ``prefix``, and of what ``turn`` adds to it (the chat
    template applied with the ``template`` options); ``problem`` says what a template that does
    not extend the prefix breaks."""
    prefix_text = tokenizer.apply_chat_template(prefix, tokenize=False)
    full_text = tokenizer.apply_chat_template([*prefix, turn], tokenize=False, **template)
    if not full_text.startswith(prefix_text):
        raise IntrospectError(f"chat template: {problem}")
    head = tokenizer.encode(prefix_text, add_special_tokens=False)
    return head, tokenizer.encode(full_text[len(prefix_text) :], add_special_tokens=False)


def answer_ids(tokenizer, answer_tokens: Sequence[str]) -> tuple[int, ...]:
    """The single token id of each of K answers (detection's ``answer_token_ids`` returns only
    the first two, so multi-way prompts use this)."""
    return tuple(answer_token_ids(tokenizer, (text, text))[0] for text in answer_tokens)


def row_steering(vectors: torch.Tensor, row, positions: tuple[int, int]) -> Steering:
    """The injection a trial row names (``vector_idx``, ``layer_start``, ``layer_end``,
    ``magnitude``), on the prompt's token ``positions``."""
    start, end = int(row.layer_start), int(row.layer_end)
    vector = vectors[int(row.vector_idx)]
    return Steering(vector, start, end, float(row.magnitude), positions=positions)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_choices(
    lm: LoadedModel, prompts: Sequence[DetectionPrompt], batch_size: int = 16
) -> tuple[list[list[float]], list[float]]:
    """K-way answer probabilities of (steered) prompts, in input order; K may vary by row, and
    the answers' raw probability mass (a low mass says the prompt leads to none of them).

    Rows are grouped by K and length (batches hold one K; padding changes no row's answer).
    """
    probs: list[list[float]] = [[] for _ in prompts]
    mass = [0.0] * len(prompts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = sorted(
        range(len(prompts)), key=lambda i: (len(prompts[i].answer_ids), len(prompts[i].prefix_ids))
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
        logits = _detection_logits(lm.model, batch).float()
        p = logits.gather(1, batch.answer_ids).softmax(-1)
        m = logits.log_softmax(-1).gather(1, batch.answer_ids).exp().sum(-1)
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
            rows = df.to_dict("records")
            write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        else:
            atomic_write(out / name, lambda tmp, df=df: df.to_parquet(tmp, index=False))
    text = json.dumps(metrics, indent=2, default=_json_default)
    write_text(out / "summary.md", summary)
    write_text(out / "metrics.json", text)
    return json.loads(text)


def finish(cfg, out_dir, metrics: dict, summary: str, tables: dict, **extra) -> dict:
    """A suite's last step: ``metrics`` with its ``config``, ``label`` and ``extra`` keys added,
    written by :func:`write_outputs`."""
    metrics.update(config=cfg.model_dump(), label=model_label(cfg), **extra)
    return write_outputs(out_dir, metrics, summary, tables)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean with a percentile-bootstrap 95 % interval over the items (nan interval if n < 2).

    The bootstrap is :func:`introspect.metrics.bootstrap_ci`'s. It resamples positives and
    negatives separately, so every item is passed as a positive beside one dummy negative that
    the statistic ignores: the positives' resamples are then exactly a plain bootstrap of the
    items."""
    import numpy as np

    from introspect.metrics import bootstrap_ci

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": math.nan, "n": 0, "ci": [math.nan, math.nan]}
    if x.size < 2:
        return {"mean": float(x.mean()), "n": 1, "ci": [math.nan, math.nan]}
    labels = np.r_[np.ones(x.size, bool), False]
    lo, hi = bootstrap_ci(
        lambda y, s: float(s[y].mean()), labels, np.r_[x, 0.0], n_boot=n_boot, seed=seed
    )
    return {"mean": float(x.mean()), "n": int(x.size), "ci": [lo, hi]}


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
    import numpy as np

    with figure(path, figsize=(max(5.0, 0.9 * len(labels) + 2.5), 4.2)) as (fig, ax):
        x = np.arange(len(labels))
        ax.bar(x, values, color="C0", alpha=0.75, yerr=whiskers(values, cis), capsize=4)
        if points is not None:
            for i, ys in enumerate(points):
                if not len(ys):
                    continue
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


def whiskers(values: Sequence[float], cis: Sequence[Sequence[float]]):
    """``[2, N]`` distances from each value down and up to its interval, as ``ax.bar`` takes
    them for ``yerr`` (an unknown interval draws no whisker)."""
    import numpy as np

    vals = np.asarray(values, dtype=float)
    lo, hi = np.asarray(cis, dtype=float).reshape(-1, 2).T
    return np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))


def rate_bars(ax, x, blocks: Sequence[dict], width: float = 0.8, **style) -> None:
    """Bars of rate blocks (:func:`rate`'s shape) at ``x``, their intervals as whiskers."""
    rates = [b["rate"] for b in blocks]
    ax.bar(x, rates, width, yerr=whiskers(rates, [b["ci"] for b in blocks]), **style)


@contextmanager
def figure(path: str | os.PathLike, *grid: int, dpi: int = 120, **options):
    """``(fig, axes)`` of ``plt.subplots(*grid, **options)`` (no display needed), laid out tight
    and written as a PNG at ``path`` (atomically) when the block ends; closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **options)
    try:
        yield fig, axes
        fig.tight_layout()
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
