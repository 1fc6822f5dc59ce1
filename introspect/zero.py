"""DeepSpeed ZeRO-3 behind the training loop's updates seam, for full fine-tuning.

Weights, gradients and optimizer state are sharded over the workers; the loop
(:func:`introspect.train.train_prompts`) is the same as under DDP and calls into the model's
submodules as before: ZeRO-3's hooks on every submodule gather each layer's weights when it
runs. ``deepspeed`` is imported only here and only when a run asks for it (the ``deepspeed``
extra), so introspect works without it.

Each worker saves its own shard of a step into its own ``step-N`` directory (DeepSpeed's
``save_checkpoint``, plus this loop's position in its ``client_state``) and loads only its own
shard back (``load_checkpoint`` reads the file of its rank). ``best/`` and ``final/`` are
exported from the weights gathered layer by layer onto rank 0.

Run on CPU (DeepSpeed's CPU accelerator over gloo) by the tests; the GPU path (NCCL, bf16, CPU
offload with DeepSpeed's compiled CPU Adam) is not run here: it needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from introspect.checkpoints import ZERO_TAG, export_model, write_checkpoint
from introspect.errors import IntrospectError
from introspect.train import TrainConfig, lr_lambda


def import_deepspeed():
    """``deepspeed``, or an error that says how to get it."""
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError:
        raise IntrospectError(
            "deepspeed: full fine-tuning under ZeRO-3 needs DeepSpeed: pip install "
            "'introspect[deepspeed]', or turn it off (deepspeed: false) to train with DDP"
        ) from None
    if deepspeed.get_accelerator().device_name() == "cpu":
        # On CPU, DeepSpeed compiles a shared-memory all-reduce when it first starts (a CPU
        # minute of C++ build, a compiler on every worker) that only its inference all-reduce
        # uses; gloo does the training collectives, so mark the op unavailable. This dict is
        # DeepSpeed's one cache of op compatibility, kept so that edits like this one hold.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class ZeroUpdates:
    """The updates seam of :func:`~introspect.train.train_prompts` over a DeepSpeed engine.

    ``ds_config`` comes from :func:`pipelines.deepspeed_config.deepspeed_config`; its
    ``gradient_accumulation_steps`` must be the config's ``grad_accum`` (DeepSpeed scales the
    loss and decides when to step).
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, n_steps: int, ds_config: dict):
        if ds_config["gradient_accumulation_steps"] != config.grad_accum:
            raise IntrospectError(
                f"grad_accum: {config.grad_accum} differs from the DeepSpeed config's "
                f"{ds_config['gradient_accumulation_steps']}"
            )
        deepspeed = import_deepspeed()
        deepspeed.init_distributed()  # adopts the process group Ray Train (or torchrun) started
        # Partition the weights one tensor at a time from the host copy. Handed a whole model,
        # initialize() would first move all of it onto each GPU (a 32B model in bf16 is 61 GiB).
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(config.warmup_steps, n_steps)
            ),
        )

    def zero_grad(self) -> None:
        """Nothing to do: the engine clears gradients after each update."""

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scaled by 1 / grad_accum inside
        # The engine counts micro-batches in step(); off the accumulation boundary that call
        # only advances the count. The boundary's step() is the update, in step() below.
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, guard: Callable[[float], None]) -> float:
        """Clip and update in one engine call; ``guard`` sees the norm after the update.

        DeepSpeed offers no hook between clipping and updating, so a non-finite gradient is
        caught one update late; the run still stops and no checkpoint is written from it.
        """
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        guard(grad_norm)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir: Path, step: int, state: dict) -> Path:
        """Every worker writes its shard (a collective); returns this worker's directory."""
        client_state = {**state, "torch_rng": torch.get_rng_state()}

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(
                str(tmp), tag=ZERO_TAG, client_state=client_state, save_latest=False
            )

        return write_checkpoint(run_dir, step, write)

    def load(self, checkpoint: Path) -> dict:
        path, state = self.engine.load_checkpoint(str(checkpoint), tag=ZERO_TAG)
        if path is None or not state:
            raise IntrospectError(
                f"checkpoint: {checkpoint} has no DeepSpeed shard for this worker; delete it to "
                f"resume from an earlier one"
            )
        torch.set_rng_state(state["torch_rng"])
        return state

    def export(self, tokenizer, out: Path, meta: dict) -> None:
        """Gather the weights layer by layer onto rank 0 (a collective); rank 0 writes."""
        # The gathering that transformers' and accelerate's ZeRO-3 saving use; the public
        # save_16bit_model() wraps it but writes one torch file, not save_pretrained's format.
        weights = self.engine._zero3_consolidated_16bit_state_dict()  # None off rank 0
        if weights is not None:
            export_model(self.engine.module, tokenizer, out, meta, state_dict=weights)
