"""Selective layer checkpoints: the top-k changed modules' ΔW, saved and added onto a model.

A checkpoint directory holds ``deltas.safetensors`` (one float tensor per module, keyed by the
base model's module name) and ``manifest.json`` (base model, modules in rank order, k, bytes,
creation time). Several checkpoints can be composed with weights: W ← W + Σ_i w_i · ΔW_i.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from introspect.errors import IntrospectError
from introspect.models import causal_lm

FORMAT = "introspect-layer-checkpoint/1"
MANIFEST, DELTAS = "manifest.json", "deltas.safetensors"

Loaded = tuple[dict, dict[str, torch.Tensor]]


def save_layer_checkpoint(
    deltas: dict[str, torch.Tensor],
    stats_df: pd.DataFrame,
    k: int | None,
    path_dir: str | os.PathLike,
    base_model: str,
) -> dict:
    """Keep the top-``k`` modules of ``stats_df`` by ``relative`` (all when None; k larger than
    the number of modules keeps all) and write their ΔW, atomically (temp dir + rename, replacing
    an existing checkpoint). Returns the manifest."""
    if k is not None and k < 1:
        raise IntrospectError(f"k: {k} must be >= 1 (or None for all modules)")
    if not base_model:
        raise IntrospectError("base_model: name the model the deltas apply to")
    for col in ("module", "relative"):
        if col not in stats_df.columns:
            raise IntrospectError(f"stats_df: no {col!r} column (make it with stance.weights)")
    ranked = stats_df.sort_values(["relative", "module"], ascending=[False, True], kind="stable")
    chosen = list(ranked["module"] if k is None else ranked["module"].head(k))
    missing = [m for m in chosen if m not in deltas]
    if missing:
        raise IntrospectError(f"deltas: no tensor for module {missing[0]!r} listed in stats_df")
    if not chosen:
        raise IntrospectError("stats_df: no modules to save")

    tensors = {m: deltas[m].detach().to("cpu").contiguous() for m in chosen}
    relative = dict(zip(ranked["module"], ranked["relative"], strict=True))
    manifest = {
        "format": FORMAT,
        "base_model": base_model,
        "k": k,
        "modules": [
            {
                "name": m,
                "shape": list(tensors[m].shape),
                "dtype": str(tensors[m].dtype).removeprefix("torch."),
                "relative": float(relative[m]),
            }
            for m in chosen
        ],
        "total_bytes": 0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    final = Path(path_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        save_file(tensors, str(tmp / DELTAS), metadata={"base_model": base_model})
        manifest["total_bytes"] = (tmp / DELTAS).stat().st_size
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_layer_checkpoint(path_dir: str | os.PathLike) -> Loaded:
    """``(manifest, {module: ΔW})``, checking that the manifest describes exactly those tensors."""
    path = Path(path_dir)
    if not path.is_dir():
        raise IntrospectError(f"layer checkpoint: {path} is not a directory")
    for name in (MANIFEST, DELTAS):
        if not (path / name).is_file():
            raise IntrospectError(f"layer checkpoint: {path / name} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntrospectError(
            f"layer checkpoint: {path / MANIFEST} is not valid JSON ({e})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntrospectError(f"layer checkpoint: {path / MANIFEST} is not a {FORMAT} manifest")
    try:
        with safe_open(str(path / DELTAS), "pt") as f:
            deltas = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise IntrospectError(
            f"layer checkpoint: {path / DELTAS} is not a readable safetensors file ({e})"
        ) from None
    try:
        listed = {m["name"]: list(m["shape"]) for m in manifest["modules"]}
    except (KeyError, TypeError) as e:
        raise IntrospectError(
            f"layer checkpoint: {path / MANIFEST} has a malformed 'modules' list ({e})"
        ) from None
    if set(listed) != set(deltas):
        only_m = sorted(set(listed) - set(deltas))
        only_t = sorted(set(deltas) - set(listed))
        raise IntrospectError(
            f"layer checkpoint: {path} manifest and tensors disagree "
            f"(in manifest only: {only_m[:5]}, in tensors only: {only_t[:5]})"
        )
    for name, shape in listed.items():
        if list(deltas[name].shape) != shape:
            raise IntrospectError(
                f"layer checkpoint: {path} module {name!r} has shape "
                f"{list(deltas[name].shape)} in the tensors but {shape} in the manifest"
            )
    return manifest, deltas


def _target_weight(lm: nn.Module, name: str) -> nn.Parameter:
    try:
        module = lm.get_submodule(name)
    except AttributeError:
        raise IntrospectError(f"{name}: no such module in the model") from None
    if hasattr(module, "base_layer"):  # a PEFT LoRA layer: change the weight it wraps
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise IntrospectError(f"{name}: is a {type(module).__name__}, not a linear layer")
    return module.weight


@torch.no_grad()
def apply_layer_checkpoints(
    model: nn.Module,
    checkpoints: Sequence[tuple[str | os.PathLike | Loaded, float]],
    base_model: str | None = None,
) -> list[str]:
    """Add Σ_i weight_i · ΔW_i onto the named linear modules of ``model``, in place.

    Each checkpoint is a directory or an already loaded ``(manifest, deltas)``. Everything is
    checked before any weight changes (missing module, shape, base model when ``base_model`` is
    given), so an error leaves the model as it was. The sum is formed in float32 (float64 for
    float64 weights) and added once per module. Returns the names of the modules changed.
    """
    lm = causal_lm(model)
    loaded: list[tuple[dict, dict[str, torch.Tensor], float, str]] = []
    for i, (source, weight) in enumerate(checkpoints):
        if isinstance(source, str | os.PathLike):
            manifest, deltas = load_layer_checkpoint(source)
            label = str(source)
        else:
            manifest, deltas = source
            label = f"checkpoint {i}"
        if not math.isfinite(float(weight)):
            raise IntrospectError(f"{label}: weight {weight} is not finite")
        if base_model is not None and manifest.get("base_model") != base_model:
            raise IntrospectError(
                f"{label}: made for base model {manifest.get('base_model')!r}, not {base_model!r}"
            )
        loaded.append((manifest, deltas, float(weight), label))

    targets: dict[str, nn.Parameter] = {}
    for _, deltas, _, label in loaded:
        for name, delta in deltas.items():
            param = targets[name] if name in targets else _target_weight(lm, name)
            if tuple(delta.shape) != tuple(param.shape):
                raise IntrospectError(
                    f"{name}: {label} has a delta of shape {tuple(delta.shape)} but the model's "
                    f"weight is {tuple(param.shape)}"
                )
            targets[name] = param

    for name, param in targets.items():
        dtype = torch.promote_types(param.dtype, torch.float32)
        total = torch.zeros(param.shape, dtype=dtype, device=param.device)
        for _, deltas, weight, _ in loaded:
            if name in deltas:
                total.add_(deltas[name].to(device=param.device, dtype=dtype), alpha=weight)
        param.copy_((param.to(dtype) + total).to(param.dtype))
    return list(targets)


@torch.no_grad()
def next_token_kl(
    model_p: nn.Module, model_q: nn.Module, tokenizer, prompts: Sequence[str]
) -> float:
    """Mean KL(p‖q) of the next-token distributions, over every position of every prompt.

    Each prompt is a user turn in the chat template, ready for the answer; positions of all
    prompts are pooled (a longer prompt weighs more). Log-softmax in float64; models are run in
    eval mode and their train/eval mode is restored afterwards.
    """
    if not prompts:
        raise IntrospectError("prompts: need at least one prompt")
    modes = [(m, m.training) for m in (model_p, model_q)]
    total, count = 0.0, 0
    try:
        for m, _ in modes:
            m.eval()
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            lp = _log_probs(model_p, ids)
            lq = _log_probs(model_q, ids).to(lp.device)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # [T]
            total += float(kl.sum())
            count += kl.numel()
    finally:
        for m, training in modes:
            m.train(training)
    return total / count


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[0]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)
