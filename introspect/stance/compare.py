"""The seed-003 comparison: full FT, distributed LoRA, surgical LoRA, selective unfreezing, DPO.

Each run starts from a fresh copy of the base model, trains on the shipped (or given) corpus,
and is then measured the same way: trainable parameters, training time, loss curve (final loss,
spikes), size of the saved artifact, stance-pattern rates and answer correctness on the same
held-out questions as the base model (greedy decoding), and the per-module weight change
(heatmap). The full fine-tune also gets selective layer checkpoints: its top-k changed modules'
ΔW applied to the base, with their size and next-token KL to the full fine-tune.

A run whose ``metrics.json`` was written under the same settings is reused on a rerun, so an
interrupted comparison resumes at the run it was in.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from introspect import models
from introspect.config import ModelChoice, parse
from introspect.errors import IntrospectError
from introspect.io import read_jsonl, write_text
from introspect.stance import behaviour, corpus
from introspect.stance.dpo import DPORunConfig, train_dpo
from introspect.stance.layer_checkpoints import (
    apply_layer_checkpoints,
    next_token_kl,
    save_layer_checkpoint,
)
from introspect.stance.patterns import ANY_KEYS, success_criteria, write_patterns
from introspect.stance.sft import SFTRunConfig, train_sft
from introspect.stance.train import StanceRun, trainer_config
from introspect.stance.tuning import LAYERED, Progress, check_layers
from introspect.stance.weights import (
    analyse_deltas,
    base_linear_weights,
    layer_index,
    linear_deltas,
    write_analysis,
)

# Learning rates: LoRA gets ~10× full fine-tuning's ("LoRA Without Regret"); selective
# unfreezing trains few full-rank matrices and sits between. Surgical / selective runs without
# ``layers`` use the middle four decoder layers.
DEFAULT_RUNS: dict[str, dict[str, Any]] = {
    "full": {"method": "full", "lr": 3e-5},
    "lora": {"method": "lora", "lr": 3e-4},
    "surgical_lora": {"method": "surgical_lora", "lr": 3e-4},
    "selective": {"method": "selective", "lr": 1e-4},
    "dpo": {"kind": "dpo", "method": "lora", "lr": 1e-4, "beta": 0.1, "batch_size": 2},
}
# Settings of the comparison that are every run's default (a run may set its own).
SHARED = ("max_steps", "batch_size", "warmup_ratio", "seed")


class CompareRun(StanceRun):
    """One run of a comparison: a :class:`StanceRun` whose ``layers`` may be left out for
    surgical_lora / selective (the middle four decoder layers are used), and whose
    ``max_steps``, ``batch_size``, ``warmup_ratio`` and ``seed`` default to the comparison's."""

    LAYERS_DEFAULTED: ClassVar[bool] = True


def _default_runs() -> dict[str, CompareRun]:
    return {name: CompareRun.model_validate(spec) for name, spec in DEFAULT_RUNS.items()}


class CompareConfig(ModelChoice):
    """Settings of one comparison (``stance compare``). ``runs`` maps a run name to its settings:
    ``kind`` (sft / dpo) and the fields of :class:`StanceRun`; given, it replaces the default
    five (full, lora, surgical_lora, selective, dpo)."""

    sft_corpus: str | None = Field(
        None, description="SFT rows: JSONL or the seed's training_corpus.json (default: shipped)"
    )
    pairs_corpus: str | None = Field(
        None, description="preference pairs for dpo runs: JSONL or seed JSON (default: shipped)"
    )
    eval_questions: str | None = Field(
        None,
        description="held-out questions: JSONL or seed baseline_questions.json (default: shipped)",
    )
    runs: dict[str, CompareRun] = Field(
        default_factory=_default_runs,
        min_length=1,
        description="run name -> {kind, method, lr, layers, ...}; replaces the default five",
    )
    max_steps: int = Field(24, ge=1, description="optimizer steps of every run that sets none")
    batch_size: int = Field(4, ge=1, description="micro-batch size of every run that sets none")
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="warm-up share of every run that sets none (HF's warm-up starts at lr 0: "
        "short runs cannot spare the steps)",
    )
    seed: int = Field(0, description="seed of every run that sets none")
    max_new_tokens: int = Field(40, ge=1, description="answer length on the held-out questions")
    gen_batch_size: int = Field(32, ge=1, description="questions per generation batch")
    checkpoint_k: list[Annotated[int, Field(ge=1)]] = Field(
        [8, 32],
        description="full fine-tune: layer checkpoints of its top-k changed modules, one per k",
    )
    kl_prompts: int = Field(8, ge=1, description="held-out questions used for the checkpoints' KL")
    compose_weight: float | None = Field(
        0.7,
        gt=0,
        lt=1,
        description="compose the full run's largest top-k checkpoint (this weight) with the "
        "selective run's (1 − weight) and measure its fidelity to the exact weight mix; null: "
        "skip (needs runs named full and selective)",
    )
    device: str | None = Field(None, description="cuda / cpu (default: cuda when available)")


def run_configs(config: CompareConfig, n_layers: int) -> dict[str, SFTRunConfig | DPORunConfig]:
    """Each run's trainer config: its own settings over the comparison's shared ones, layers
    defaulted and checked against the model (errors name ``runs.<name>.<field>``)."""
    middle = list(range(max(0, n_layers // 2 - 2), min(n_layers, n_layers // 2 + 2)))
    out = {}
    for name, spec in config.runs.items():
        data = {k: getattr(config, k) for k in SHARED} | spec.model_dump(exclude_unset=True)
        if spec.method in LAYERED and spec.layers is None:
            data["layers"] = middle
        run = trainer_config(parse(StanceRun, data, f"runs.{name}"))
        try:
            check_layers(run, n_layers)
        except IntrospectError as e:
            raise IntrospectError(f"runs.{name}.{e}") from None
        out[name] = run
    return out


def _kind(run: SFTRunConfig | DPORunConfig) -> str:
    return "dpo" if isinstance(run, DPORunConfig) else "sft"


def _done(out: Path, settings: dict) -> dict | None:
    """``out``'s metrics when they were made under ``settings`` (a rerun reuses them)."""
    path = out / "metrics.json"
    done = json.loads(path.read_text()) if path.is_file() else None
    return done if done is not None and done.get("settings") == settings else None


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False))  # a NaN is a bug: refuse it


def _behaviour(lm, questions, config: CompareConfig, out: Path) -> tuple[dict, list[dict]]:
    """Answers, pattern rates and correctness of one model, written under ``out``."""
    rows = behaviour.respond(lm, questions, config.max_new_tokens, config.gen_batch_size)
    corpus.write_jsonl(rows, out / "responses.jsonl")
    rated = behaviour.pattern_rows(rows)
    correct = {c: behaviour.correctness(rows, c) for c in ("factual", "syllogism")}
    summary = write_patterns(rated, out) if rated else {"rates": None}
    result = {
        "n": len(rows),
        "empty": len(rows) - len(rated),
        "rates": summary["rates"],
        "correct": correct,
    }
    return result, rows


def _criteria(after: dict, before: dict | None) -> list[dict]:
    """The seed's pass/fail table; the factual criterion compares with ``before`` (the base)."""
    if after["rates"] is None:
        return []
    given = {"syllogism": after["correct"]["syllogism"]}
    if before is not None:
        given |= {
            "factual_before": before["correct"]["factual"],
            "factual_after": after["correct"]["factual"],
        }
    return success_criteria(after["rates"], {k: v for k, v in given.items() if v is not None})


def _weights(base, tuned, out: Path, title: str) -> tuple[dict, pd.DataFrame, dict]:
    """Per-module ΔW analysis (JSON + heatmap in ``out``) and a summary of it, including each
    decoder layer's relative change ‖ΔW_layer‖_F / ‖W_layer‖_F over all its linear modules."""
    deltas = linear_deltas(base, tuned)
    df = analyse_deltas(deltas, base)
    write_analysis(df, out, title)
    w_sq: dict[int, float] = {}
    for name, w in base_linear_weights(base).items():
        layer = layer_index(name)
        if layer is not None:
            w_sq[layer] = w_sq.get(layer, 0.0) + float(w.detach().double().pow(2).sum())
    d_sq = {layer: 0.0 for layer in w_sq}
    for module, fro in zip(df["module"], df["frobenius"], strict=True):
        layer = layer_index(module)
        if layer is not None:
            d_sq[layer] += fro**2
    # Adam moves every entry by roughly the learning rate, whatever the gradient's size: when
    # RMS(ΔW) is about equal across modules, ‖ΔW‖/‖W‖ just ranks matrices by 1/RMS(W).
    rms_delta = df["frobenius"] / np.sqrt(df["params"])
    rms_w = df["frobenius"] / df["relative"] / np.sqrt(df["params"])
    scale = {"rms_delta_cv": None, "corr_relative_inv_rms_w": None}
    if len(df) > 2:
        scale["rms_delta_cv"] = float(rms_delta.std() / rms_delta.mean())
        corr = float(np.corrcoef(np.log(df["relative"]), -np.log(rms_w))[0, 1])
        scale["corr_relative_inv_rms_w"] = corr if np.isfinite(corr) else None  # constant input
    stats = ["relative", "stable_rank", "effective_rank"]
    summary = {
        "modules_changed": len(df),
        "top": df.head(5)[["module", *stats]].to_dict("records"),
        **{f"median_{s}": float(df[s].median()) if len(df) else 0.0 for s in stats},
        "layer_relative": {str(k): (d_sq[k] / w_sq[k]) ** 0.5 for k in sorted(w_sq)},
        **scale,
    }
    return summary, df, deltas


def _checkpoints(base_lm, tuned, deltas, df, config: CompareConfig, questions, out: Path) -> dict:
    """Top-k layer checkpoints of the full fine-tune: bytes and KL(full ‖ base + top-k ΔW)."""
    prompts = [q.question for q in questions[: config.kl_prompts]]
    tok = base_lm.tokenizer
    base_kl = next_token_kl(tuned, base_lm.model, tok, prompts)
    rows = [{"k": 0, "modules": 0, "bytes": 0, "has_lm_head": False, "kl_to_tuned": base_kl}]
    for k in sorted(set(config.checkpoint_k)):  # a k above the module count keeps them all
        path = out / f"top{k}"
        manifest = save_layer_checkpoint(deltas, df, k, path, base_model=config.model)
        patched = copy.deepcopy(base_lm.model)
        apply_layer_checkpoints(patched, [(path, 1.0)])
        rows.append(
            {
                "k": k,
                "modules": len(manifest["modules"]),
                "bytes": manifest["total_bytes"],
                "has_lm_head": any(m["name"] == "lm_head" for m in manifest["modules"]),
                "kl_to_tuned": next_token_kl(tuned, patched, tok, prompts),
                "path": str(path.relative_to(out.parent)),
            }
        )
        del patched
    return {"prompts": len(prompts), "rows": rows}


def _composition(base_lm, out: Path, results: dict, config: CompareConfig, questions) -> dict:
    """Selective checkpoints composed: base + w·(full's largest top-k checkpoint) + (1 − w)·
    (the selective run's checkpoint), against the exact mix base + w·ΔW_full + (1 − w)·
    ΔW_selective. Fidelity = 1 − KL(exact ‖ composed) / KL(exact ‖ base)."""
    from introspect.stance.tuning import load_tuned

    w = config.compose_weight
    full = results["full"]["layer_checkpoints"]["rows"][-1]
    selective = out / "selective" / "artifact"
    composed = copy.deepcopy(base_lm.model)
    apply_layer_checkpoints(composed, [(out / "full" / full["path"], w), (selective, 1 - w)])
    exact = load_tuned(out / "full" / "artifact", base=config.model, device=config.device).model
    with torch.no_grad():  # exact = w·full + (1 − w)·base, then + (1 − w)·ΔW_selective
        for p_exact, p_base in zip(exact.parameters(), base_lm.model.parameters(), strict=True):
            p_exact.copy_(w * p_exact + (1 - w) * p_base.to(p_exact.dtype))
    apply_layer_checkpoints(exact, [(selective, 1 - w)])
    prompts = [q.question for q in questions[: config.kl_prompts]]
    tok = base_lm.tokenizer
    kl = next_token_kl(exact, composed, tok, prompts)
    scale = next_token_kl(exact, base_lm.model, tok, prompts)
    return {"weights": [w, 1 - w], "full_checkpoint": full["path"], "full_modules": full["modules"],
            "kl_exact_composed": kl, "kl_exact_base": scale,
            "fidelity": 1 - kl / scale if scale > 0 else None, "prompts": len(prompts)}


def _model_settings(config: CompareConfig) -> dict:
    # dtype only when set, so that runs made before it was a setting are still reused
    return {"model": config.model, **({"dtype": config.dtype} if config.dtype else {})}


def _settings(config: CompareConfig, name: str, run) -> dict:
    """What a run's results depend on (a rerun reuses them only if this is unchanged)."""
    return {
        **_model_settings(config),
        "kind": _kind(run),
        "run": run.model_dump(),
        "sft_corpus": config.sft_corpus,
        "pairs_corpus": config.pairs_corpus,
        "eval_questions": config.eval_questions,
        "max_new_tokens": config.max_new_tokens,
        "checkpoint_k": config.checkpoint_k if run.method == "full" else None,
        "kl_prompts": config.kl_prompts,
        "name": name,
    }


def _one_run(name, run, config, base_lm, base, data, questions, out: Path) -> dict:
    settings = _settings(config, name, run)
    if done := _done(out, settings):
        return done
    lm = models.load(config.model, dtype=config.dtype, device=config.device)
    if _kind(run) == "dpo":
        result = train_dpo(lm, data["pairs"], run, out)
    else:
        result = train_sft(lm, data["sft"], run, out)
    after, rows = _behaviour(lm, questions, config, out)
    title = f"{name} ({_kind(run)}, {run.method})"
    weights, df, deltas = _weights(base_lm.model, lm.model, out, title)
    metrics = {
        "settings": settings,
        "kind": _kind(run),
        "method": run.method,
        "lr": run.lr,
        **{k: v for k, v in result.to_dict().items() if k not in ("method", "artifact_dir")},
        "artifact_dir": str(Path(result.artifact_dir).relative_to(out.parent)),
        "behaviour": after,
        "shift": {
            g: behaviour.paired_change(base["rows"], rows, g) for g in ("performative", "pragmatic")
        },
        "criteria": _criteria(after, base["behaviour"]),
        "weights": weights,
    }
    if run.method == "full" and config.checkpoint_k:
        metrics["layer_checkpoints"] = _checkpoints(
            base_lm, lm.model, deltas, df, config, questions, out / "layer_checkpoints"
        )
    _write_json(out / "metrics.json", metrics)
    del lm, deltas
    gc.collect()
    return metrics


def _base(base_lm, questions, config: CompareConfig, out: Path) -> dict:
    """The base model's behaviour (reused from ``out`` when made under the same settings)."""
    settings = {
        **_model_settings(config),
        "eval_questions": config.eval_questions,
        "max_new_tokens": config.max_new_tokens,
    }
    if done := _done(out, settings):
        return {**done, "rows": read_jsonl(out / "responses.jsonl")}
    result, rows = _behaviour(base_lm, questions, config, out)
    base = {"settings": settings, "behaviour": result, "criteria": _criteria(result, None)}
    _write_json(out / "metrics.json", base)
    return {**base, "rows": rows}


def run_stance_comparison(
    config: CompareConfig | dict, out_dir: str | os.PathLike, *, progress: Progress | None = None
) -> dict:
    """Train and measure every run of ``config`` (see :class:`CompareConfig`), writing
    ``metrics.json``, ``summary.md`` and PNGs into ``out_dir``. Returns the metrics, with
    ``overview`` (one row per run: what ``stance compare`` shows) and ``summary_md``.

    ``progress(done, total)`` is called after the base model and after each run."""
    from introspect.stance.report import write_report

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = parse(CompareConfig, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers, _ = models.dims(cfg.model)
    runs = run_configs(cfg, n_layers)
    data = {
        "sft": corpus.read_sft(cfg.sft_corpus or corpus.shipped("sft")),
        "pairs": corpus.read_pairs(cfg.pairs_corpus or corpus.shipped("pairs")),
    }
    questions = corpus.read_eval_questions(cfg.eval_questions or corpus.shipped("eval"))

    total = 1 + len(runs)
    base_lm = models.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    base = _base(base_lm, questions, cfg, out / "base")
    report = progress or (lambda done, total: None)
    report(1, total)
    results = {}
    for i, (name, run) in enumerate(runs.items(), 2):
        results[name] = _one_run(name, run, cfg, base_lm, base, data, questions, out / name)
        report(i, total)
    composition = None
    if cfg.compose_weight is not None and "layer_checkpoints" in results.get("full", {}) and (
        results.get("selective", {}).get("method") == "selective"
    ):
        composition = _composition(base_lm, out, results, cfg, questions)
    metrics = {
        "model": cfg.model,
        "n_layers": n_layers,
        "composition": composition,
        "corpus": {
            "sft": len(data["sft"]),
            "pairs": len(data["pairs"]),
            "eval_questions": len(questions),
        },
        "base": {k: v for k, v in base.items() if k != "rows"},
        "runs": results,
        "overview": overview(results),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "summary_md": str(out / "summary.md"),
    }
    write_report(metrics, cfg, out)
    _write_json(out / "metrics.json", metrics)
    return metrics


def overview(runs: dict[str, dict]) -> list[dict]:
    """One row per run: trainable parameters, training seconds, final loss, and the share of
    held-out answers with any performative / pragmatic pattern (None without classified
    answers)."""
    rows = []
    for name, r in runs.items():
        overall = (r["behaviour"]["rates"] or {}).get("overall", {})
        rows.append(
            {
                "run": name,
                "trainable_params": r["trainable_params"],
                "train_seconds": r["train_seconds"],
                "final_loss": r["stability"]["final"],
                **{k: overall[k]["rate"] if k in overall else None for k in ANY_KEYS},
            }
        )
    return rows


def summary_line(metrics: dict) -> str:
    """``12.3 min → out/summary.md``"""
    return f"{metrics['seconds'] / 60:.1f} min → {metrics['summary_md']}"
