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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from introspect import models
from introspect.errors import IntrospectError
from introspect.evals.common import atomic_write, parse_config
from introspect.stance import behaviour, corpus
from introspect.stance.dpo import DPORunConfig, train_dpo
from introspect.stance.layer_checkpoints import (
    apply_layer_checkpoints,
    next_token_kl,
    save_layer_checkpoint,
)
from introspect.stance.patterns import success_criteria, write_patterns
from introspect.stance.sft import SFTRunConfig, train_sft
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


@dataclass
class CompareConfig:
    """Settings of one comparison. ``runs`` maps a run name to ``kind`` (sft / dpo) and the
    fields of :class:`SFTRunConfig` / :class:`DPORunConfig`; given, it replaces the default five.
    ``max_steps``, ``batch_size``, ``warmup_ratio`` and ``seed`` are defaults for every run."""

    model: str = "smollm2-135m"
    sft_corpus: str | None = None  # JSONL / seed JSON; None: the shipped sft.jsonl
    pairs_corpus: str | None = None  # None: the shipped pairs.jsonl
    eval_questions: str | None = None  # None: the shipped eval.jsonl
    runs: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_RUNS))
    max_steps: int = 24  # defaults for every run (a run may set its own)
    batch_size: int = 4
    warmup_ratio: float = 0.0  # HF's warm-up starts at lr 0; short runs cannot spare steps
    seed: int = 0
    max_new_tokens: int = 40
    gen_batch_size: int = 32
    checkpoint_k: list[int] = field(default_factory=lambda: [8, 32])
    kl_prompts: int = 8  # held-out questions used for the checkpoints' KL
    device: str | None = None

    def validate(self) -> None:
        if not self.runs:
            raise IntrospectError("runs: name at least one run")
        for name in ("max_steps", "batch_size", "max_new_tokens", "gen_batch_size", "kl_prompts"):
            if getattr(self, name) < 1:
                raise IntrospectError(f"{name}: {getattr(self, name)} must be >= 1")
        if any(k < 1 for k in self.checkpoint_k):
            raise IntrospectError(f"checkpoint_k: {self.checkpoint_k} must all be >= 1")


def run_configs(config: CompareConfig, n_layers: int) -> dict[str, SFTRunConfig | DPORunConfig]:
    """Each run's validated trainer config (errors name ``runs.<name>.<field>``)."""
    middle = list(range(max(0, n_layers // 2 - 2), min(n_layers, n_layers // 2 + 2)))
    out = {}
    for name, spec in config.runs.items():
        if not isinstance(spec, dict):
            raise IntrospectError(f"runs.{name}: expected a mapping of settings")
        spec = dict(spec)
        kind = spec.pop("kind", "sft")
        if kind not in ("sft", "dpo"):
            raise IntrospectError(f"runs.{name}.kind: {kind!r} must be 'sft' or 'dpo'")
        base = {
            "max_steps": config.max_steps,
            "batch_size": config.batch_size,
            "warmup_ratio": config.warmup_ratio,
            "seed": config.seed,
        }
        if spec.get("method") in ("surgical_lora", "selective"):
            base["layers"] = middle
        cls = DPORunConfig if kind == "dpo" else SFTRunConfig
        try:
            run = parse_config(cls, {**base, **spec})
            run.validate(n_layers)
        except IntrospectError as e:
            raise IntrospectError(f"runs.{name}.{e}") from None
        out[name] = run
    return out


def _kind(run: SFTRunConfig | DPORunConfig) -> str:
    return "dpo" if isinstance(run, DPORunConfig) else "sft"


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _behaviour(lm, questions, config: CompareConfig, out: Path) -> tuple[dict, list[dict]]:
    """Answers, pattern rates and correctness of one model, written under ``out``."""
    rows = behaviour.respond(lm, questions, config.max_new_tokens, config.gen_batch_size)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out / "responses.jsonl", lambda tmp: Path(tmp).write_text(text))
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
    top = df.head(5)[["module", "relative", "stable_rank", "effective_rank"]]
    summary = {
        "modules_changed": len(df),
        "top": top.to_dict("records"),
        "median_relative": float(df["relative"].median()) if len(df) else 0.0,
        "median_stable_rank": float(df["stable_rank"].median()) if len(df) else 0.0,
        "median_effective_rank": float(df["effective_rank"].median()) if len(df) else 0.0,
        "layer_relative": {str(k): (d_sq[k] / w_sq[k]) ** 0.5 for k in sorted(w_sq)},
        **scale,
    }
    return summary, df, deltas


def _checkpoints(base_lm, tuned, deltas, df, config: CompareConfig, questions, out: Path) -> dict:
    """Top-k layer checkpoints of the full fine-tune: bytes and KL(full ‖ base + top-k ΔW)."""
    prompts = [q.question for q in questions[: config.kl_prompts]]
    tok = base_lm.tokenizer
    rows = [
        {
            "k": 0,
            "modules": 0,
            "bytes": 0,
            "has_lm_head": False,
            "kl_to_tuned": next_token_kl(tuned, base_lm.model, tok, prompts),
        }
    ]
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


def _settings(config: CompareConfig, name: str, run) -> dict:
    """What a run's results depend on (a rerun reuses them only if this is unchanged)."""
    return {
        "model": config.model,
        "kind": _kind(run),
        "run": asdict(run),
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
    done = _load_json(out / "metrics.json")
    if done is not None and done.get("settings") == settings:
        return done
    lm = models.load(config.model, device=config.device)
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
        "model": config.model,
        "eval_questions": config.eval_questions,
        "max_new_tokens": config.max_new_tokens,
    }
    done = _load_json(out / "metrics.json")
    if done is not None and done.get("settings") == settings:
        rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        return {**done, "rows": rows}
    result, rows = _behaviour(base_lm, questions, config, out)
    base = {"settings": settings, "behaviour": result, "criteria": _criteria(result, None)}
    _write_json(out / "metrics.json", base)
    return {**base, "rows": rows}


def run_stance_comparison(config: dict, out_dir: str | os.PathLike) -> dict:
    """Plan stage: train and measure every run of ``config`` (see :class:`CompareConfig`),
    writing ``metrics.json``, ``summary.md`` and PNGs into ``out_dir``. Returns the metrics."""
    from introspect.stance.report import write_report

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = parse_config(CompareConfig, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers, _ = models.dims(cfg.model)
    runs = run_configs(cfg, n_layers)
    data = {
        "sft": corpus.read_sft(cfg.sft_corpus or corpus.shipped("sft")),
        "pairs": corpus.read_pairs(cfg.pairs_corpus or corpus.shipped("pairs")),
    }
    questions = corpus.read_eval_questions(cfg.eval_questions or corpus.shipped("eval"))

    base_lm = models.load(cfg.model, device=cfg.device)
    base = _base(base_lm, questions, cfg, out / "base")
    results = {}
    for name, run in runs.items():
        results[name] = _one_run(name, run, cfg, base_lm, base, data, questions, out / name)
    metrics = {
        "model": cfg.model,
        "n_layers": n_layers,
        "corpus": {
            "sft": len(data["sft"]),
            "pairs": len(data["pairs"]),
            "eval_questions": len(questions),
        },
        "base": {k: v for k, v in base.items() if k != "rows"},
        "runs": results,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
    write_report(metrics, cfg, out)
    _write_json(out / "metrics.json", metrics)
    return metrics
