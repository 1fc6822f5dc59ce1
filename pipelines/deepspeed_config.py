"""A DeepSpeed ZeRO-3 config for full fine-tuning, derived from the model's size and the hardware.

Pure arithmetic: no GPU and no ``deepspeed`` import, so the plan can be checked anywhere.

Memory per GPU follows DeepSpeed's own estimator
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``): with bf16 weights,
ZeRO-3 keeps per parameter 2 bytes of weights, 4 of fp32 gradients for the step, and 12 of fp32
master weights and Adam's two moments, i.e. 18 bytes sharded over the GPUs, plus the largest
layer gathered whole (its weights and gradients, 4 bytes per parameter). Offloading the
optimizer leaves only the weight shard on the GPU; offloading the weights too leaves only the
gathered layer. Activations are not modelled: they depend on the micro-batch and sequence
length, and the ``headroom`` fraction of each GPU is left free for them (and for DeepSpeed's
prefetch and live-parameter buffers, the CUDA context and fragmentation).

The weights are partitioned one tensor at a time from a copy on the CPU (``zero.Init(module=)``
in :mod:`introspect.zero`), so a GPU never holds the whole model, but each process on a node
first loads the whole model into host memory: that load peak is part of the CPU estimate.

Bucket sizes follow the values transformers' DeepSpeed integration fills in for ``"auto"``:
``reduce_bucket_size = h²``, ``stage3_prefetch_bucket_size = 0.9·h²``,
``stage3_param_persistence_threshold = 10·h`` for hidden size ``h``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from introspect.errors import IntrospectError

GIB = 2**30
# Least offload first: ``auto`` takes the first that fits.
OFFLOADS = ("none", "optimizer", "optimizer+params")
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}  # fp16 would add loss scaling: not wired
GRAD_BYTES = 4  # fp32 gradient partition the optimizer steps on
ADAM_BYTES = 12  # fp32 master weights + Adam m + v
# DeepSpeed's estimator pads host-memory needs by half for pinned buffers and copies.
CPU_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class ModelSize:
    """What the memory plan and the bucket sizes need to know about a model."""

    n_params: int
    hidden_size: int
    largest_layer: int  # parameters of the largest single module (usually the embedding)


def model_size(config: Mapping[str, Any] | Any) -> ModelSize:
    """Parameter count of a Llama/Qwen2/Mistral-style decoder from its Hugging Face config.

    Takes a ``config.json`` mapping or a ``PretrainedConfig``. Counts the embedding (twice when
    the LM head is not tied), per layer the q/k/v/o projections (grouped-query K/V, Qwen2's
    q/k/v biases), the three SwiGLU matrices and two norms, and the final norm. Exact for
    Qwen2.5-7B (7,615,616,512) and Qwen2.5-Coder-32B (32,763,876,352).
    """
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    try:
        h, layers, vocab = (
            int(get("hidden_size")),
            int(get("num_hidden_layers")),
            int(get("vocab_size")),
        )
    except (TypeError, ValueError):
        raise IntrospectError(
            "model config: needs hidden_size, num_hidden_layers and vocab_size"
        ) from None
    heads = int(get("num_attention_heads") or 1)
    kv = (int(get("num_key_value_heads") or heads)) * (h // heads)
    inter = int(get("intermediate_size") or 4 * h)
    bias = bool(get("attention_bias", get("model_type") == "qwen2"))
    per_layer = 2 * h * h + 2 * h * kv + (h + 2 * kv if bias else 0) + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if get("tie_word_embeddings", False) else 2)
    return ModelSize(layers * per_layer + embeddings + h, h, max(vocab * h, h * inter))


@dataclass(frozen=True)
class MemoryPlan:
    """The offload chosen and what it costs, in GiB."""

    offload: str
    gpu_gib: float  # model states per GPU under ``offload``
    cpu_gib: float  # host memory per node: the larger of the load peak and offloaded states
    budget_gib: float  # what a GPU may hold: its memory less the headroom
    per_offload: dict[str, float]  # GPU GiB under each option, least offload first


def gpu_need(size: ModelSize, offload: str, num_gpus: int, weight_bytes: int = 2) -> float:
    """Model states per GPU in GiB under one offload option."""
    shard = {"none": weight_bytes + GRAD_BYTES + ADAM_BYTES, "optimizer": weight_bytes}
    gathered = 2 * weight_bytes * size.largest_layer  # one layer's weights and gradients
    return (shard.get(offload, 0) * size.n_params / num_gpus + gathered) / GIB


def cpu_need(
    size: ModelSize, offload: str, num_gpus: int, gpus_per_node: int, weight_bytes: int = 2
) -> float:
    """Host memory per node in GiB: the load peak or the offloaded states, whichever is larger."""
    load = gpus_per_node * weight_bytes * size.n_params  # every process loads the whole model
    offloaded = {
        "optimizer": GRAD_BYTES + ADAM_BYTES,
        "optimizer+params": GRAD_BYTES + ADAM_BYTES + weight_bytes,
    }
    per_param = offloaded.get(offload, 0)
    states = per_param * size.n_params / num_gpus * gpus_per_node * CPU_BUFFER_FACTOR
    return max(load, states) / GIB


def memory_plan(
    size: ModelSize,
    num_gpus: int,
    gpu_gib: float,
    offload: str = "auto",
    dtype: str = "bfloat16",
    headroom: float = 0.25,
    gpus_per_node: int | None = None,
    cpu_gib: float | None = None,
) -> MemoryPlan:
    """Pick (``auto``) or check an offload option against the GPUs (and host memory if given).

    ``auto`` takes the least offload whose model states fit in ``gpu_gib × (1 − headroom)``
    and, when ``cpu_gib`` (per node) is given, whose host memory fits in ``cpu_gib ×
    (1 − headroom)``. Errors name the field to change.
    """
    _check_positive(n_params=size.n_params, num_gpus=num_gpus, gpu_gib=gpu_gib)
    if offload != "auto" and offload not in OFFLOADS:
        raise IntrospectError(
            f"offload: {offload!r} must be 'auto' or one of {', '.join(OFFLOADS)}"
        )
    if dtype not in DTYPE_BYTES:
        raise IntrospectError(f"dtype: {dtype!r} must be one of {', '.join(DTYPE_BYTES)}")
    if not 0 <= headroom < 1:
        raise IntrospectError(f"headroom: {headroom} must be in [0, 1)")
    gpus_per_node = min(gpus_per_node or num_gpus, num_gpus)
    w = DTYPE_BYTES[dtype]
    per = {o: gpu_need(size, o, num_gpus, w) for o in OFFLOADS}
    cpu = {o: cpu_need(size, o, num_gpus, gpus_per_node, w) for o in OFFLOADS}
    budget = gpu_gib * (1 - headroom)
    cpu_budget = None if cpu_gib is None else cpu_gib * (1 - headroom)

    def fits_cpu(o: str) -> bool:
        return cpu_budget is None or cpu[o] <= cpu_budget

    choices = OFFLOADS if offload == "auto" else (offload,)
    for o in choices:
        if per[o] <= budget and fits_cpu(o):
            return MemoryPlan(o, per[o], cpu[o], budget, per)
    # Nothing fits: say which resource ran out for the most offloaded option tried.
    last = choices[-1]
    table = ", ".join(f"{o}: {per[o]:.1f}" for o in OFFLOADS)
    if per[last] > budget:
        # Past the most offload, the GPU holds one whole layer: only a larger GPU helps.
        field = "offload" if offload != "auto" else "gpu_gib"
        raise IntrospectError(
            f"{field}: {size.n_params / 1e9:.2f}B parameters need {per[last]:.1f} GiB per GPU "
            f"with offload {last!r}, over the {budget:.1f} GiB budget ({gpu_gib:g} GiB less "
            f"{headroom:.0%} headroom) on {num_gpus} GPU(s); GiB per GPU by offload: {table}"
        )
    raise IntrospectError(
        f"cpu_gib: offload {last!r} needs {cpu[last]:.1f} GiB of host memory per node, over the "
        f"{cpu_budget:.1f} GiB budget ({cpu_gib:g} GiB less {headroom:.0%} headroom)"
    )


def deepspeed_config(
    size: ModelSize,
    num_gpus: int,
    micro_batch: int,
    grad_accum: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    dtype: str = "bfloat16",
    offload: str = "none",
) -> dict:
    """The DeepSpeed config dict for ZeRO-3 full fine-tuning (``offload`` already decided).

    AdamW comes from the config: torch's AdamW when the optimizer stays on the GPU (no op to
    compile), DeepSpeed's CPU Adam when it is offloaded (compiled on first use; needs a C++
    compiler on the worker).
    """
    _check_positive(hidden_size=size.hidden_size, num_gpus=num_gpus, micro_batch=micro_batch)
    _check_positive(grad_accum=grad_accum)
    if offload not in OFFLOADS:
        raise IntrospectError(f"offload: {offload!r} must be one of {', '.join(OFFLOADS)}")
    h = size.hidden_size
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        # best/ and final/ are exported from the weights gathered onto rank 0.
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * num_gpus,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": [0.9, 0.999],  # torch's AdamW defaults, as in the DDP path
                "eps": 1e-8,
                "torch_adam": offload == "none",
            },
        },
        "steps_per_print": 2**31 - 1,  # the loop logs every step itself
        "wall_clock_breakdown": False,
    }


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise IntrospectError(f"{name}: {value} must be > 0")
