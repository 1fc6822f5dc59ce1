"""The dtype a model runs in: one option, one default, and fp32 master weights for training.

Every recipe that loads a model takes ``dtype`` (``introspect.config.Precision``); ``None`` means
:func:`default_dtype`: bfloat16 on a CUDA GPU, bfloat16 on a CPU with AMX tiles once the detection
benchmark has shown that results hold there (:data:`CPU_BF16_HOLDS`), float32 elsewhere.

A CPU with AVX512-BF16 but no AMX stays at float32 by default, because bf16 is slower there: on
such a 2-core CPU a [464, 576] x [576, 1536] linear took 8.2 ms in bf16 against 4.3 in fp32, and
in the reference benchmark our scoring and training ran 1.4-1.5 times slower in bf16 than in fp32,
the reference-shaped loop 1.2-1.4 times (``benchmarks/results/reference_cpu_avx512*.json``); on a
CPU with AMX, bf16 ran about three times faster than fp32 (``reference_cpu.json``).

``INTROSPECT_CPU_BF16`` in the environment overrides the CPU rule: ``0`` keeps any CPU at float32
(the test suite sets it: it compares code paths at 1e-4; or to reproduce an fp32 result), ``1``
takes bfloat16 on any CPU with native bf16 arithmetic (AVX512-BF16 or AMX). Being an environment
variable, it reaches Ray workers started from that environment.

Training in a low-precision dtype keeps what it updates in float32, because a bf16 weight
cannot take an AdamW step much smaller than 1/256 of itself:

* LoRA: the frozen base weights stay in bf16; peft keeps the adapter weights in fp32 (its
  ``autocast_adapter_dtype``) and :func:`train_precision` makes sure of it, so the optimizer's
  moments are fp32 too.
* Full fine-tuning: the weights are upcast to fp32 (the master copy AdamW updates) and every
  forward runs under ``torch.autocast`` in the low dtype, so the matmuls are bf16.
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

# benchmarks/results/detection_cpu_bf16.json shows the condition met on this project's CPU:
# `original` trained and evaluated in bf16 lands inside the fp32 run's interval on every B1 tier
# (held-out 0.986 vs 0.991 [0.982, 0.996]).
CPU_BF16_HOLDS = True

LOW = (torch.bfloat16, torch.float16)


def _cpu_has(*checks: str) -> bool:
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX tiles)."""
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@functools.cache
def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles, where bf16 matmuls outrun fp32 ones."""
    return _cpu_has("_is_amx_tile_supported")


def cpu_bf16_default() -> bool:
    """Whether a CPU model loads in bf16 when no dtype is asked for."""
    wanted = os.environ.get("INTROSPECT_CPU_BF16", "")
    if wanted == "0" or not CPU_BF16_HOLDS:
        return False
    return native_bf16_cpu() if wanted == "1" else amx_cpu()


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a model loads in when none is asked for, on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_bf16_default()):
        return torch.bfloat16
    return torch.float32


def resolve(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """``dtype`` as a torch dtype, or the default on ``device``."""
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype or default_dtype(device)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``, as configs and reports spell it."""
    return str(dtype).removeprefix("torch.")


def train_precision(model: nn.Module, method: str) -> torch.dtype | None:
    """Make what training updates fp32; return the dtype to autocast the forward in, if any.

    Call after LoRA is attached (or the weights unfrozen), before the optimizer is built.
    """
    compute = next(model.parameters()).dtype
    if compute not in LOW:
        return None
    if method == "full":
        model.float()
        return compute
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` in ``dtype`` on ``device``'s kind, or nothing when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def weights_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtypes of the frozen and of the trained weights (``{"frozen": …, "trained": …}``)."""
    seen: dict[str, set[str]] = {"frozen": set(), "trained": set()}
    for p in model.parameters():
        seen["trained" if p.requires_grad else "frozen"].add(dtype_name(p.dtype))
    return {k: ",".join(sorted(v)) for k, v in seen.items() if v}
