"""Training checkpoints: trainable weights + optimizer, scheduler, RNG and position.

A checkpoint directory is complete only once its ``COMPLETE`` marker is inside it; it is written
under a temporary name and renamed, so a run killed mid-save leaves the previous one in charge.
Weights are safetensors; the optimizer/scheduler/RNG state is read back with
``torch.load(weights_only=True)``. Under DeepSpeed ZeRO-3 every worker writes its own shard of
the same step into its own ``step-N`` directory (``ZERO_TAG``, see :mod:`introspect.zero`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from introspect.errors import IntrospectError
from introspect.io import write_json
from introspect.manifest import damage, write_manifest

COMPLETE = "COMPLETE"
ZERO_TAG = "zero"  # the subdirectory of a checkpoint that holds DeepSpeed's per-worker shards
TMP_PREFIX = ".tmp-"  # directories being written (see replace_dir); never read as results


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def replace_dir(final: Path, fill: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """``fill(tmp)`` fills a fresh hidden directory beside ``final``, which then takes its place.

    A directory cannot be renamed over a full one, so an existing ``final`` is first renamed
    aside and deleted after the swap: at every moment ``final`` is either the old directory or
    the new one, never a half-written one. With ``keep_existing`` an existing ``final`` wins
    (another process finished the same work first) and the new copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        if not final.exists():
            os.replace(tmp, final)
        elif keep_existing:
            shutil.rmtree(tmp)
        else:
            old = tmp.with_name(f"{tmp.name}-old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clear_stale(final: Path) -> list[Path]:
    """Remove the half-written tries of ``final`` that a killed process left behind (a lost
    worker, a killed driver): ``replace_dir`` cleans up after an error, not after a SIGKILL.
    Only ``final``'s own (its ``.tmp-<name>-<8 hex>`` and their ``-old``); returns what it
    removed. The caller makes sure no live try is among them (a plan has one runner)."""
    final = Path(final)
    mine = re.compile(rf"{re.escape(TMP_PREFIX + final.name)}-[0-9a-f]{{8}}(-old)?")
    stale = [p for p in final.parent.glob(f"{TMP_PREFIX}*") if mine.fullmatch(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary directory; marked complete, it becomes ``step-N``."""

    def fill(tmp: Path) -> None:
        write(tmp)
        # A ZeRO-3 checkpoint is every worker's step-N merged in storage, and each worker
        # restores only its own shard from it: no one worker's list of files holds there.
        if not (tmp / ZERO_TAG).exists():
            write_manifest(tmp)
        (tmp / COMPLETE).write_text(str(step))

    return replace_dir(run_dir / "checkpoints" / f"step-{step:06d}", fill)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    """Trainable weights (safetensors) + optimizer/scheduler/RNG/position, written atomically."""

    def write(tmp: Path) -> None:
        weights = {n: p.detach().contiguous().cpu() for n, p in trainable(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save({**saved, "torch_rng": torch.get_rng_state(), **state}, tmp / "state.pt")

    return write_checkpoint(run_dir, step, write)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint with its completion marker (a half-written one is ignored) whose
    files still match its manifest. A damaged newer one (truncated by a copy or a full disk
    after it was written) is passed over with one warning line, and the run resumes from the
    one before; it is never deleted here."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / COMPLETE).exists())
    for path in reversed(done):
        problem = damage(path)
        if problem is None:
            return path
        print(f"warning: checkpoint {path} is damaged ({problem}); passed over", file=sys.stderr)
    return None


def load_trainable(path: Path, model) -> None:
    """Copy a checkpoint's trainable weights into ``model`` (same trainable set required)."""
    if (path / ZERO_TAG).is_dir():
        raise IntrospectError(
            f"checkpoint: {path} holds DeepSpeed ZeRO-3 shards, one per training worker; "
            f"evaluate the run's best/ or final/ export instead (or merge the shards with the "
            f"zero_to_fp32.py script inside it)"
        )
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except Exception as e:  # damaged files raise several types
        raise IntrospectError(
            f"checkpoint: {path} cannot be read ({e}); delete it to resume from an earlier one"
        ) from None
    params = trainable(model)
    if set(weights) != set(params):
        raise IntrospectError(
            f"checkpoint: {path} does not match this model/config (different trainable weights)"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the saved position and bests."""
    load_trainable(path, model)
    try:
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:
        raise IntrospectError(
            f"checkpoint: {path} cannot be read ({e}); delete it to resume from an earlier one"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; also clear what a killed save left behind.

    Only the run's single writer calls this (every ZeRO-3 worker writes its own run directory),
    so a temporary directory found here belongs to no save in progress.
    """
    ckpts = run_dir / "checkpoints"
    done = sorted(p for p in ckpts.glob("step-*") if (p / COMPLETE).exists())
    for p in done[:-keep] + sorted(ckpts.glob(f"{TMP_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True)


def export_model(model, tokenizer, out: Path, meta: dict, state_dict: dict | None = None) -> None:
    """save_pretrained format (an adapter for LoRA, the whole model for full FT), atomically.

    ``state_dict`` stands in for the model's own weights when those are sharded (ZeRO-3).
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if meta.get("method") == "full":
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "meta.json", meta)

    replace_dir(out, fill)
