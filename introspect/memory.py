"""What a model costs in memory and compute, from its config alone: no weights are loaded.

The model is built on the meta device from its ``config.json`` (shipped for the models the
plans name, under ``resources/configs/``; fetched from the hub otherwise), which gives exact
parameter counts, and the LoRA parameters of any ``target_modules``.

Training memory per device, for one steer-then-remove step at batch ``B``, prefix length ``Tp``,
suffix length ``Ts`` (``w`` bytes per weight and activation, ``L`` layers, hidden ``h``, MLP
width ``i``, K/V width ``kv = kv_heads × head_dim``):

* weights: ``n_params × w``;
* LoRA state: ``n_lora × 16`` (peft keeps adapters in fp32 under bf16 weights: parameter,
  gradient and Adam's two moments, 4 bytes each); full fine-tuning: ``n_params × (w + w + 2w)``
  (gradients and AdamW's moments in the weights' dtype);
* the steered KV cache: ``2 · L · B · Tp · kv · w``, held through the suffix pass and backward;
* suffix activations saved for backward, per layer and token ``w · (7h + 3i + t·r)`` (the two
  norms' inputs and outputs, q, the attention's output before and after its reshape, the MLP's
  gate, up and activation, each LoRA adapter's rank-r intermediate for t targets), plus the
  prefix + suffix keys and values the attention saves, ``2 · B · (Tp + Ts) · kv · w`` per layer.
  Under gradient checkpointing only each layer's input (``B · Ts · h · w``) is kept, plus one
  layer's full set while it is recomputed;
* the answer logits, ``B · vocab · 4 · 2`` (fp32, and their gradient).

The tests check the activation, cache and state terms against what a real step on CPU saves for
backward (``torch.autograd.graph.saved_tensors_hooks``) and holds. On a GPU add the CUDA context
and the allocator's slack (:data:`CUDA_OVERHEAD_GIB`, :data:`ALLOCATOR_SLACK`).

Compute per token: ``2 · n_matmul`` FLOPs forward (the decoder's matrix weights; the LM head runs
on one position per example), attention ``4 · L · h · context``; backward through frozen weights
(LoRA) the same again, ``2×`` with weight gradients (full); a recomputed forward under
checkpointing once more.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from introspect.errors import IntrospectError

GIB = 2**30
CUDA_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers
ALLOCATOR_SLACK = 0.10  # fragmentation in PyTorch's caching allocator
LORA_STATE_BYTES = 16  # fp32 parameter + gradient + Adam m + v
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    """The facts of a decoder that memory and FLOPs depend on."""

    name: str
    n_params: int
    n_matmul: int  # parameters of the decoder layers' linear maps (FLOPs per token / 2)
    n_layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value width: kv_heads × head_dim
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every decoder linear

    def lora_params(self, targets: list[str], r: int) -> int:
        """Trainable parameters of LoRA rank ``r`` on the linears named ``targets``."""
        return sum(r * (i + o) for name, i, o in self.linears if name.rsplit(".", 1)[-1] in targets)


def shipped_config(name: str) -> dict | None:
    """A config.json shipped for planning (``owner/name`` → ``owner--name``), or None."""
    path = resources.files("introspect") / "resources" / "configs" / name.replace("/", "--")
    path = path / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def model_config(name: str) -> dict:
    """The config of a model by alias, local directory, shipped copy or (online) hub id."""
    from introspect.models import tiny_config

    if name == "tiny-random":
        return tiny_config().to_dict()
    if name == "smollm2-135m":
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = Path(name) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    shipped = shipped_config(name)
    if shipped is not None:
        return shipped
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).to_dict()
    except OSError as e:
        raise IntrospectError(
            f"model: no config for {name!r}: not shipped, and the hub said: "
            f"{str(e).splitlines()[0]}"
        ) from None


@functools.cache
def arch(name: str) -> Arch:
    """``name``'s architecture, counted on a meta-device build of its config (no weights)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = model_config(name)
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items()
                                                        if k != "model_type"})  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = tuple(
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{n}"
    )
    text = getattr(config, "get_text_config", lambda: config)()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return Arch(
        name=name,
        n_params=sum(p.numel() for p in model.parameters()),
        n_matmul=sum(i * o for _, i, o in linears),
        n_layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        kv=kv_heads * head_dim,
        vocab=text.vocab_size,
        linears=linears,
    )


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class TrainShape:
    batch: int
    prefix: int  # tokens of the steered prefix (longest in a batch)
    suffix: int  # tokens of the question and prefill
    dtype_bytes: int = 2
    method: str = "lora"
    lora_r: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    checkpointing: bool = False


def train_memory(a: Arch, s: TrainShape) -> dict[str, float]:
    """Bytes per device of one training step, by part (see the module docstring)."""
    w, B, L = s.dtype_bytes, s.batch, a.n_layers
    weights = a.n_params * w
    if s.method == "lora":
        state = a.lora_params(list(s.targets), s.lora_r) * LORA_STATE_BYTES
    else:
        state = a.n_params * 3 * w  # gradients + AdamW's two moments, in the weights' dtype
    kv_cache = 2 * L * B * s.prefix * a.kv * w
    lora = len(s.targets) * s.lora_r if s.method == "lora" else 0  # each adapter's A output
    per_layer = B * s.suffix * w * (7 * a.hidden + 3 * a.intermediate + lora)
    attention_kv = 2 * B * (s.prefix + s.suffix) * a.kv * w
    if s.checkpointing:
        activations = L * B * s.suffix * a.hidden * w + per_layer + attention_kv
    else:
        activations = L * (per_layer + attention_kv)
    logits = B * a.vocab * 4 * 2
    return {
        "weights": weights,
        "optimizer_state": state,
        "kv_cache": kv_cache,
        "activations": activations,
        "logits": logits,
    }


def eval_memory(a: Arch, batch: int, tokens: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes of a model host scoring or generating ``batch`` rows of ``tokens`` tokens."""
    w = dtype_bytes
    return {
        "weights": a.n_params * w,
        "kv_cache": 2 * a.n_layers * batch * tokens * a.kv * w,
        "activations": batch * tokens * w * (2 * a.hidden + 3 * a.intermediate),
        "logits": batch * a.vocab * 4,
    }


def on_gpu(parts: dict[str, float]) -> float:
    """A device's peak in bytes: the parts, the allocator's slack and the CUDA context."""
    return sum(parts.values()) * (1 + ALLOCATOR_SLACK) + CUDA_OVERHEAD_GIB * GIB


# --------------------------------------------------------------------------- compute


def forward_flops(a: Arch, tokens: int, context: int | None = None) -> float:
    """FLOPs of a forward pass over ``tokens`` tokens attending to ``context`` positions."""
    context = tokens if context is None else context
    return 2 * a.n_matmul * tokens + 4 * a.n_layers * a.hidden * tokens * context / 2


def train_flops(a: Arch, s: TrainShape) -> float:
    """FLOPs of one training example: steered prefix forward, suffix forward and backward."""
    prefix = forward_flops(a, s.prefix)
    suffix = forward_flops(a, s.suffix, s.prefix + s.suffix)
    backward = suffix * (2 if s.method == "full" else 1)
    recompute = suffix if s.checkpointing else 0
    head = 2 * a.hidden * a.vocab * 3
    return prefix + suffix + backward + recompute + head
