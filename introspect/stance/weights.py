"""How much, and in what shape, fine-tuning changed each linear weight matrix.

This measures the weights themselves: ΔW = W_tuned − W_base per ``nn.Linear``, with its
Frobenius norm, its size relative to W, and two notions of its rank (stable rank
‖ΔW‖²_F/‖ΔW‖²_2 and the Roy & Vetterli effective rank). It is not WeightWatcher's power-law
alpha of W, which says nothing directly about how much W moved.

A PEFT LoRA model is read without merging: per LoRA module the delta is
``scaling · B @ A`` of the active adapter(s), reported under the base model's module name
(``model.layers.3.self_attn.q_proj``), so it equals what ``merge_and_unload`` would add.

:func:`run_stance_weights` (config :class:`StanceWeightsConfig`) is ``stance weights``: the
analysis of a ``stance train`` artifact against its base model.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import torch
from pydantic import Field
from torch import nn

from introspect.config import Config, parse
from introspect.errors import IntrospectError
from introspect.io import atomic_write
from introspect.models import causal_lm

STAT_COLUMNS = (
    "frobenius",
    "relative",
    "spectral",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
)
# Heatmap column order: attention then MLP, as data flows through a Llama-style layer.
_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --------------------------------------------------------------------------- deltas


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _lora_delta(module: nn.Module, name: str) -> torch.Tensor | None:
    """``Σ_active scaling · B @ A`` (transposed for fan_in_fan_out), or None when it adds nothing.

    Nothing is added by a layer whose adapters are disabled (the model then behaves as the base),
    or one already merged (its base_layer weight holds the delta, measured from there).
    """
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    base_weight = module.base_layer.weight
    dtype = _compute_dtype(base_weight)
    total = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise IntrospectError(
                f"{name}: adapter {adapter!r} is DoRA, whose delta is not scaling·B@A; "
                "merge a copy with merge_and_unload() and compare the merged model instead"
            )
        a = module.lora_A[adapter].weight.to(dtype)
        b = module.lora_B[adapter].weight.to(dtype)
        delta = (b @ a) * module.scaling[adapter]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        total = delta if total is None else total + delta
    return total


def _tuned_linears(tuned: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{base module name: (weight as the base layer holds it, extra adapter delta or None)}``."""
    lm = causal_lm(tuned)
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    wrapped: list[str] = []  # prefixes of PEFT wrappers, whose inner Linears are not base modules
    for name, module in lm.named_modules():
        if any(name.startswith(p + ".") for p in wrapped):
            continue
        if _is_lora_layer(module):
            wrapped.append(name)
            if isinstance(module.base_layer, nn.Linear):
                out[name] = (module.base_layer.weight, _lora_delta(module, name))
        elif _is_modules_to_save(module):
            wrapped.append(name)
            active = getattr(module, "active_adapter", None)
            if isinstance(active, list | tuple):
                active = active[0] if active else None
            inner = module.modules_to_save[active] if active in module.modules_to_save else None
            if getattr(module, "disable_adapters", False) or inner is None:
                inner = module.original_module
            if isinstance(inner, nn.Linear):
                out[name] = (inner.weight, None)
        elif isinstance(module, nn.Linear):
            out[name] = (module.weight, None)
    return out


def base_linear_weights(base: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` of every ``nn.Linear`` in the (unwrapped) base model."""
    return {n: m.weight for n, m in causal_lm(base).named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def linear_deltas(
    base: nn.Module, tuned: nn.Module, include_zero: bool = False
) -> dict[str, torch.Tensor]:
    """ΔW = W_tuned − W_base for every ``nn.Linear`` weight, keyed by the base's module name.

    Computed in float32 (float64 for float64 weights) on the weights' device. For a PEFT model
    the LoRA part is ``scaling · B @ A`` of the active adapter(s), never merged in place, plus any
    difference between the wrapped base layer and ``base`` (zero when the adapter sits on
    ``base``). Only nonzero deltas are kept unless ``include_zero``. Embeddings, norms and biases
    are not linear weights and are not covered.
    """
    base_w = base_linear_weights(base)
    tuned_w = _tuned_linears(tuned)
    missing = sorted(set(base_w) - set(tuned_w))
    extra = sorted(set(tuned_w) - set(base_w))
    if missing or extra:
        what = f"missing from tuned: {missing[:5]}" if missing else f"not in base: {extra[:5]}"
        raise IntrospectError(f"models: the two models' linear modules differ ({what})")
    out: dict[str, torch.Tensor] = {}
    for name, w0 in base_w.items():
        w1, adapter = tuned_w[name]
        if w1.shape != w0.shape:
            raise IntrospectError(
                f"{name}: weight shape {tuple(w1.shape)} in tuned vs {tuple(w0.shape)} in base"
            )
        dtype = _compute_dtype(w0)
        delta = w1.detach().to(dtype) - w0.detach().to(device=w1.device, dtype=dtype)
        if adapter is not None:
            delta = delta + adapter.to(device=delta.device, dtype=dtype)
        if include_zero or bool(delta.any()):
            out[name] = delta
    return out


# --------------------------------------------------------------------------- statistics


@torch.no_grad()
def delta_stats(delta: torch.Tensor, weight: torch.Tensor) -> dict[str, float]:
    """Size and rank of one ΔW relative to its base weight W, computed in float64.

    * ``frobenius`` ‖ΔW‖_F; ``relative`` ‖ΔW‖_F / ‖W‖_F; ``spectral`` ‖ΔW‖_2 (largest σ).
    * ``stable_rank`` ‖ΔW‖²_F / ‖ΔW‖²_2, in [1, rank]: how many directions carry the energy.
    * ``effective_rank`` exp(H(p)), p_i = σ_i / Σσ (Roy & Vetterli 2007), in [1, rank].
      Singular values below ``σ_max · max(m, n) · eps`` (float32's eps unless ΔW is float64) are
      round-off and left out, as ``torch.linalg.matrix_rank`` does; ``numerical_rank`` counts
      those kept.
    A zero ΔW gives zeros throughout.

    Caveat: a ΔW taken between low-precision checkpoints (bf16) carries their rounding noise,
    about 2⁻⁸·|W| per entry, which is full-rank: ``numerical_rank`` and ``effective_rank`` then
    count it, while ``stable_rank`` (dominated by the large σ) hardly moves.
    """
    if delta.ndim != 2 or delta.shape != weight.shape:
        raise IntrospectError(
            f"delta: shape {tuple(delta.shape)} must be 2-d and match the weight's "
            f"{tuple(weight.shape)}"
        )
    d = delta.detach().to(torch.float64)
    w_norm = float(torch.linalg.matrix_norm(weight.detach().to(torch.float64), "fro"))
    fro = float(torch.linalg.matrix_norm(d, "fro"))
    zeros = dict.fromkeys(STAT_COLUMNS, 0.0)
    if fro == 0.0:
        return zeros | {"numerical_rank": 0}
    sigma = torch.linalg.svdvals(d)
    spectral = float(sigma[0])
    eps = torch.finfo(torch.float64 if delta.dtype == torch.float64 else torch.float32).eps
    kept = sigma[sigma > spectral * max(d.shape) * eps]
    p = kept / kept.sum()
    entropy = float(-(p * p.log()).sum())
    return {
        "frobenius": fro,
        "relative": fro / w_norm if w_norm > 0 else math.inf,
        "spectral": spectral,
        "stable_rank": fro**2 / spectral**2,
        "effective_rank": math.exp(entropy),
        "numerical_rank": int(kept.numel()),
    }


def layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to (``...layers.N....``), or None (e.g. ``lm_head``)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def analyse_deltas(deltas: dict[str, torch.Tensor], base: nn.Module) -> pd.DataFrame:
    """One row per delta with its stats, ranked by ``relative`` (rank 1 = largest change)."""
    weights = base_linear_weights(base)
    rows = []
    for name, delta in deltas.items():
        if name not in weights:
            raise IntrospectError(f"{name}: no such linear module in the base model")
        rows.append(
            {
                "module": name,
                "layer": layer_index(name),
                "kind": name.rsplit(".", 1)[-1],
                "shape": "x".join(str(s) for s in delta.shape),
                "params": int(delta.numel()),
                **delta_stats(delta, weights[name]),
            }
        )
    columns = ["module", "layer", "kind", "shape", "params", *STAT_COLUMNS]
    df = pd.DataFrame(rows, columns=columns)
    df["layer"] = df["layer"].astype("Int64")
    df["numerical_rank"] = df["numerical_rank"].astype(int)
    df = df.sort_values(["relative", "module"], ascending=[False, True], kind="stable")
    df = df.reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def analyse(base: nn.Module, tuned: nn.Module, include_zero: bool = False) -> pd.DataFrame:
    """Per-module weight changes from ``base`` to ``tuned`` (either may be a PEFT model), ranked
    as :func:`analyse_deltas` ranks them."""
    return analyse_deltas(linear_deltas(base, tuned, include_zero=include_zero), base)


# --------------------------------------------------------------------------- output


def write_analysis(df: pd.DataFrame, out_dir: str | os.PathLike, title: str) -> dict[str, Path]:
    """``weight_changes.json`` (records, atomic) and ``weight_changes.png`` (layer × kind heatmap
    of ``relative``; modules outside the decoder layers, like ``lm_head``, are in the JSON only).
    The PNG is skipped when no module lies in a decoder layer. Returns the paths written."""
    from introspect.plots import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "weight_changes.json"}
    atomic_write(
        written["json"],
        lambda tmp: df.to_json(tmp, orient="records", indent=2, double_precision=15),
    )

    layered = df[df["layer"].notna()]
    if len(layered):
        present = set(layered["kind"])
        kinds = [k for k in _KIND_ORDER if k in present] + sorted(present - set(_KIND_ORDER))
        pivot = layered.pivot_table(index="layer", columns="kind", values="relative", aggfunc="max")
        pivot = pivot.reindex(columns=kinds).sort_index()
        pivot.index = [int(i) for i in pivot.index]
        written["png"] = out / "weight_changes.png"
        heatmap(  # written atomically by introspect.plots
            pivot,
            written["png"],
            title=f"{title}\nrelative change ‖ΔW‖_F / ‖W‖_F",
            xlabel="module",
            ylabel="layer",
            fmt="{:.2g}",
        )
    return written


# --------------------------------------------------------------------------- recipe

TOP_COLUMNS = ("rank", "module", "relative", "stable_rank", "effective_rank")


class StanceWeightsConfig(Config):
    """``stance weights``: per-module ΔW of a trained artifact against its base model."""

    run: str = Field(description="run directory of `stance train`, or the artifact/ inside it")
    base: str | None = Field(
        None, description="base model (default: the one the artifact's meta.json names)"
    )
    top: int = Field(
        10, ge=1, description="largest changes listed in the result (the JSON lists them all)"
    )


def run_stance_weights(config: StanceWeightsConfig | dict, out_dir: str | os.PathLike) -> dict:
    """``weight_changes.json`` and ``weight_changes.png`` of ``config.run`` in ``out_dir``, on
    the CPU. Returns ``modules_changed``, the ``top`` rows (``TOP_COLUMNS``) and the paths."""
    from introspect import models
    from introspect.stance.tuning import load_tuned

    cfg = parse(StanceWeightsConfig, config)
    tuned = load_tuned(cfg.run, cfg.base, device="cpu")
    base_lm = models.load(cfg.base or tuned.name, device="cpu")
    df = analyse(base_lm.model, tuned.model)
    title = f"{Path(cfg.run).name}: weight change vs {base_lm.name}"
    written = write_analysis(df, out_dir, title)
    return {
        "run": cfg.run,
        "base_model": base_lm.name,
        "modules_changed": len(df),
        "top": df.head(cfg.top)[list(TOP_COLUMNS)].to_dict("records"),
        "written": {k: str(v) for k, v in written.items()},
    }


def summary_line(metrics: dict) -> str:
    """``3 changed modules → out/weight_changes.json, out/weight_changes.png``"""
    paths = ", ".join(metrics["written"].values())
    return f"{metrics['modules_changed']} changed modules → {paths}"
