"""Detection finetuning: teach a model to say whether its prefix was steered.

One step: the batched prefix pass under ``no_grad`` with per-row steering fills the cache, the
suffix pass runs with gradients, and the loss is the 2-way cross-entropy over the (yes, no)
logits at the answer position, plus ``mass_weight`` times the pair's negative log mass (an answer
pair the model does not already say, such as Red/Blue, has to be learnt as the answer format).
LoRA (peft) or full fine-tuning; AdamW with linear warm-up and decay; clipping; accumulation.

Data order is a function of (seed, micro-step) alone, and a checkpoint holds the trainable
weights, optimizer, scheduler and RNG state and the step, so a resumed run takes exactly the
batches an uninterrupted run would have. A non-finite loss or gradient stops the run and leaves
the last good checkpoint in place.

``train`` is a plain function of (model, data, config) with no global state: the Ray engine runs
this same loop inside its workers.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from introspect.checkpoints import (
    COMPLETE,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    trainable,
)
from introspect.detection import (
    DetectionPrompt,
    collate,
    head_rows,
    prefix_cache,
    steered_cache,
    suffix_hidden,
)
from introspect.distributed import average_gradients, barrier, sum_scalars, world
from introspect.dropout import use_bits_dropout
from introspect.errors import IntrospectError
from introspect.examples import tokenise_examples, tokenised_prompts
from introspect.io import write_json, write_text
from introspect.models import LoadedModel, causal_lm
from introspect.packed import (
    can_pack,
    pack_cache,
    packed_cache,
    packed_suffix_hidden,
    use_packed,
)
from introspect.precision import autocast, dtype_name, train_precision, weights_dtypes
from introspect.recompute import checkpoint_layers
from introspect.train_config import PRESETS as PRESETS  # re-exported: the public names
from introspect.train_config import TrainConfig as TrainConfig
from introspect.train_config import preset as preset
from introspect.vectors import VectorSet


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int | None
    best_val_accuracy: float
    final_val_accuracy: float
    final_val_loss: float


# --------------------------------------------------------------------------- data order


def micro_batch(n: int, batch_size: int, seed: int, micro_step: int) -> np.ndarray:
    """Indices of one micro-batch: a seeded permutation per epoch, sliced by the step.

    A pure function of its arguments, so a resumed (or restarted) worker picks up exactly where
    the interrupted one stopped. The last partial batch of an epoch is dropped.
    """
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise IntrospectError(f"batch_size: {batch_size} is larger than the {n} training examples")
    epoch, k = divmod(micro_step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def grouped_batch(
    groups: Sequence[Sequence[int]], batch_size: int, contexts: int, seed: int, micro_step: int
) -> np.ndarray:
    """Indices of one micro-batch of ``contexts`` groups (rows sharing a prefix), an equal
    share of the batch from each.

    Per epoch, each group's rows are shuffled and cut into chunks of ``batch_size // contexts``
    (a remainder is dropped) and the chunks are shuffled; batch ``k`` is chunks
    ``[k * contexts, (k + 1) * contexts)``. A pure function of its arguments, as
    :func:`micro_batch` is, so resumed runs take the same batches.
    """
    per = batch_size // contexts
    n_chunks = sum(len(g) // per for g in groups)
    per_epoch = n_chunks // contexts
    if per_epoch < 1:
        raise IntrospectError(
            f"contexts_per_batch: {contexts} prefixes of {per} rows each do not fit in the "
            f"training data ({len(groups)} prefixes, {n_chunks} chunks of {per})"
        )
    epoch, k = divmod(micro_step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    chunks = []
    for g in groups:
        rows = np.asarray(g)[rng.permutation(len(g))]
        chunks += [rows[i : i + per] for i in range(0, len(rows) - per + 1, per)]
    order = rng.permutation(len(chunks))[k * contexts : (k + 1) * contexts]
    return np.concatenate([chunks[i] for i in order])


def prefix_groups(prompts: Sequence[DetectionPrompt]) -> list[list[int]]:
    """Row indices grouped by prefix token ids, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p.prefix_ids), []).append(i)
    return list(groups.values())


def total_steps(config: TrainConfig, n: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = n // config.batch_size
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


# --------------------------------------------------------------------------- model set-up


def prepare_model(lm: LoadedModel, config: TrainConfig) -> torch.nn.Module:
    """Wrap with LoRA or unfreeze everything. Modifies ``lm.model`` in place and returns it."""
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            lm.model = get_peft_model(lm.model, lora)
        except ValueError as e:
            raise IntrospectError(f"target_modules: {e}") from None
        if next(lm.model.parameters()).device.type == "cpu":
            use_bits_dropout(lm.model)  # CUDA's dropout is fused; a CPU's draws dominate
    else:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    use_packed(lm.model)  # batches without their padding (introspect.packed)
    if config.gradient_checkpointing:
        checkpoint_layers(lm.model)  # not transformers' own: it would drop the steered cache
    return lm.model


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to zero at the last step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# --------------------------------------------------------------------------- updates


class TorchUpdates:
    """How gradients become weight updates, and how that state is saved: plain torch.

    AdamW with warm-up and decay on every worker; gradients are averaged over the workers with
    ``all_reduce`` (DDP's arithmetic), then clipped. The loop talks to this object only, so
    :class:`introspect.zero.ZeroUpdates` can run the same loop under DeepSpeed ZeRO-3.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, n_steps: int):
        self.model = model
        self.params = list(trainable(model).values())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.warmup_steps, n_steps)
        )
        self.grad_accum, self.max_grad_norm = config.grad_accum, config.max_grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, guard: Callable[[float], None]) -> float:
        """Average, clip, let ``guard(grad_norm)`` stop a diverged run, then update."""
        average_gradients(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        guard(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir: Path, step: int, state: dict) -> Path | None:
        """Rank 0 writes the checkpoint (the state is the same everywhere); others return None."""
        if world()[0] != 0:
            return None
        return save_checkpoint(run_dir, step, self.model, self.optimizer, self.scheduler, state)

    def load(self, checkpoint: Path) -> dict:
        return load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)

    def export(self, tokenizer, out: Path, meta: dict) -> None:
        """Called on every worker; rank 0 writes."""
        if world()[0] == 0:
            export_model(self.model, tokenizer, out, meta)


# --------------------------------------------------------------------------- the loop


def label_targets(labels: Sequence) -> torch.Tensor:
    """Class indices into each prompt's answer tokens.

    A boolean label picks from the (positive, negative) pair: 0 for true, 1 for false. An
    integer label is already an index (multi-way answers, e.g. localisation).
    """
    out = [(0 if y else 1) if isinstance(y, bool | np.bool_) else int(y) for y in labels]
    return torch.tensor(out, dtype=torch.long)


def answer_loss(
    pair: torch.Tensor, targets: torch.Tensor, mass_weight: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over the answer pair's log-probabilities (``[B, answers]``, from
    :func:`answer_pair`) plus ``mass_weight`` × −log of the pair's mass; with weight 1 this is
    −log p(target) over the whole vocabulary."""
    loss = F.cross_entropy(pair, targets, reduction=reduction)
    if mass_weight:
        nll_mass = -pair.logsumexp(-1)
        loss = loss + mass_weight * (nll_mass.sum() if reduction == "sum" else nll_mass.mean())
    return loss


def answer_pair(
    model,
    prompts: Sequence[DetectionPrompt],
    pad_id: int,
    share_prefixes: bool = False,
    prefix_grad: bool = False,
    normalise: bool = True,
    packed: bool = True,
) -> torch.Tensor:
    """``[B, answers]`` log-probabilities (over the vocabulary) of each prompt's answer tokens;
    a softmax over them is the K-way answer distribution. Rows with fewer answers than the
    batch's most (a 3-way question beside a 10-way one) get −inf in the spare columns.

    The steered prefix is read without grad and in eval mode: dropout there would only add noise
    to the cache, since no gradient flows through it (it also costs a third of the prefix pass
    on a CPU). ``share_prefixes``: rows with the same prefix share it below their steered layers.
    ``prefix_grad``: the prefix pass keeps its graph (train mode), so gradients reach the
    adapter's effect on the steered tokens' keys and values. ``normalise=False``: the answer
    tokens' raw logits instead, through their LM-head rows only; they differ from the
    log-probabilities by one constant per row, so a softmax over the answers (the 2-way loss,
    the argmax) is the same without the whole vocabulary. ``packed``: without padding
    (:mod:`introspect.packed`) where the model allows it and the prefix has no grad; a shared
    prefix pass stays padded and only the suffix pass is packed.
    """
    k = [len(p.answer_ids) for p in prompts]
    if min(k) < max(k):
        prompts = [
            replace(p, answer_ids=tuple(p.answer_ids) + (p.answer_ids[0],) * (max(k) - n))
            for p, n in zip(prompts, k, strict=True)
        ]
    batch = collate(prompts, pad_id).to(next(model.parameters()).device)
    pack = packed and not prefix_grad and can_pack(model)
    if prefix_grad:
        cache = steered_cache(model, batch, grad=True)
    else:
        was_training = model.training
        model.eval()
        try:
            if pack and not share_prefixes:
                cache = packed_cache(model, batch)
            else:
                cache = prefix_cache(model, batch, share_prefixes)
                if pack:  # a shared prefix pass is padded; its suffix pass need not be
                    cache = pack_cache(model, cache, batch)
        finally:
            model.train(was_training)
    read = packed_suffix_hidden if pack else suffix_hidden
    hidden = read(model, batch, cache)
    if normalise:
        logits = causal_lm(model).get_output_embeddings()(hidden).float()
        out = logits.log_softmax(-1).gather(1, batch.answer_ids)
    else:
        out = head_rows(model, hidden, batch.answer_ids).float()
    if min(k) < max(k):
        n = torch.tensor(k, device=out.device)[:, None]
        out = out.masked_fill(torch.arange(max(k), device=out.device) >= n, float("-inf"))
    return out


@torch.no_grad()
def validate(
    model,
    prompts,
    labels,
    pad_id: int,
    batch_size: int,
    cast: torch.dtype | None = None,
    mass_weight: float = 0.0,
) -> tuple[float, float]:
    """Validation accuracy and mean training loss (:func:`answer_loss`) over the answer tokens
    (forward autocast to ``cast`` when given).

    Under data parallelism each worker takes every ``world``-th prompt and the sums are
    combined, so every worker returns the same numbers for the whole set. Every worker runs the
    same number of batches, because ZeRO-3 gathers each layer's weights with a collective
    inside the forward pass: a worker short of a row repeats its first one, uncounted.
    """
    was_training = model.training
    model.eval()
    rank, size = world()
    rows = list(range(rank, len(prompts), size))
    n_real = len(rows)
    rows += (rows[:1] or [0]) * (-(-len(prompts) // size) - n_real)
    targets = label_targets([labels[i] for i in rows])
    total_loss, correct = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = [prompts[i] for i in rows[start : start + batch_size]]
        with autocast(device, cast):
            pair = answer_pair(model, chunk, pad_id, normalise=mass_weight > 0)
        keep = max(0, min(len(pair), n_real - start))
        pair, t = pair[:keep], targets[start : start + keep].to(pair.device)
        total_loss += float(answer_loss(pair, t, mass_weight, "sum")) if keep else 0.0
        correct += int((pair.argmax(-1) == t).sum())
    model.train(was_training)
    total_loss, correct, n = sum_scalars([total_loss, correct, n_real])
    return correct / n, total_loss / n


def train(
    lm: LoadedModel,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    vector_sets: Mapping[str, VectorSet],
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    on_save: Callable[[int, Path | None, dict], None] | None = None,
    updates: Callable[[torch.nn.Module, TrainConfig, int], TorchUpdates] = TorchUpdates,
) -> TrainResult:
    """Train ``lm`` (in place) on example rows; write checkpoints, logs and the best model.

    Builds the prompts and hands over to :func:`train_prompts`.
    """
    from introspect.data import default_prompts

    info = default_prompts()["info_prompt"] if config.info_prompt else None
    val_df = val_df.iloc[: config.val_max_examples]
    to_prompts = lambda df: tokenised_prompts(  # noqa: E731
        tokenise_examples(lm.tokenizer, df, info), vector_sets, lm.n_layers, lm.d_model
    )
    return train_prompts(
        lm,
        to_prompts(train_df),
        train_df["label"].tolist(),
        to_prompts(val_df),
        val_df["label"].tolist(),
        config,
        run_dir,
        resume=resume,
        progress=progress,
        on_step=on_step,
        on_save=on_save,
        updates=updates,
    )


def train_prompts(
    lm: LoadedModel,
    train_set: Sequence[DetectionPrompt],
    train_labels: Sequence,
    val_set: Sequence[DetectionPrompt],
    val_labels: Sequence,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    on_save: Callable[[int, Path | None, dict], None] | None = None,
    updates: Callable[[torch.nn.Module, TrainConfig, int], TorchUpdates] = TorchUpdates,
) -> TrainResult:
    """The training loop over tokenised trials; labels are booleans or answer indices.

    ``progress(done, total)`` is called with the optimizer steps done (also once before the
    first, so a resumed run starts where it left off) on the writing worker only; each step's
    numbers are in ``log.jsonl`` and in ``on_save``'s record.
    ``on_step(step, model)`` runs after each optimizer step (tests use it to inject a fault).
    ``on_save(step, checkpoint_dir, record)`` runs on every worker after each checkpoint (the
    directory this worker wrote: rank 0's, or every worker's shard under ZeRO-3; None where
    nothing was written): Ray Train reports checkpoints from it. ``updates(model, config,
    n_steps)`` builds the optimizer side (:class:`TorchUpdates`, or DeepSpeed's).

    Under a ``torch.distributed`` process group, each global batch (the same indices as in one
    process) is split across the workers and gradients are averaged, so the run follows the
    single-process run; only rank 0 writes files.
    """
    rank, size = world()
    if config.batch_size % size:
        raise IntrospectError(
            f"batch_size: {config.batch_size} must be a multiple of the {size} workers"
        )
    run_dir = Path(run_dir)
    writer = rank == 0
    held = any((run_dir / "checkpoints").glob(f"step-*/{COMPLETE}"))
    if writer and not resume and (held or (run_dir / "final").exists()):
        raise IntrospectError(
            f"out: {run_dir} already holds a run; pass --resume or pick another --out"
        )
    if not train_set or not val_set:
        raise IntrospectError("data: the training and validation sets must both have rows")
    val_set = list(val_set)[: config.val_max_examples]
    val_labels = list(val_labels)[: config.val_max_examples]

    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    compute = next(lm.model.parameters()).dtype  # what the forward runs in, kept below
    model = prepare_model(lm, config)
    # DeepSpeed keeps its own fp32 master weights under its bf16 mode.
    cast = train_precision(model, config.method) if updates is TorchUpdates else None
    if writer:
        write_json(
            run_dir / "config.json",
            {
                **config.model_dump(),
                "model": lm.name,
                "dtype": dtype_name(compute),
                "weights_dtype": weights_dtypes(model),
            },
        )
    n_steps = total_steps(config, len(train_set))
    opt = updates(model, config, n_steps)

    step, best_acc, best_step = 0, -1.0, None
    log_path = run_dir / "log.jsonl"
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and held:
        raise IntrospectError(
            f"checkpoint: every checkpoint in {run_dir / 'checkpoints'} is damaged; delete that "
            "directory to train from the start"
        )
    if ckpt is not None:
        state = opt.load(ckpt)
        step, best_acc, best_step = state["step"], state["best_acc"], state["best_step"]
        if writer:
            _truncate_log(log_path, step)
    elif writer and log_path.exists():
        log_path.unlink()

    def meta(at: int, acc: float, loss: float) -> dict:  # an export's meta.json
        return {
            "step": at,
            "val_accuracy": acc,
            "val_loss": loss,
            "method": config.method,
            "base_model": lm.name,
        }

    def guard(grad_norm: float) -> None:
        """Stop on a non-finite loss or gradient (DeepSpeed: checked after its update)."""
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            return
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
        what = "loss" if not math.isfinite(loss_sum) else "gradient"
        raise TrainingDiverged(
            f"step {step + 1}: non-finite {what} (loss {loss_sum / config.grad_accum}, "
            f"grad norm {grad_norm}); stopped, {where}"
        )

    model.train()
    pair_device = next(model.parameters()).device
    groups = prefix_groups(train_set) if config.contexts_per_batch else None

    def batch_rows(micro_step: int) -> np.ndarray:
        if groups is None:
            return micro_batch(len(train_set), config.batch_size, config.seed, micro_step)
        return grouped_batch(
            groups, config.batch_size, config.contexts_per_batch, config.seed, micro_step
        )

    show = progress if writer else None
    last_good = ckpt
    val_acc, val_loss = float("nan"), float("nan")
    if show is not None:
        show(step, n_steps)
    while step < n_steps:
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_sum, correct, seen = 0.0, 0, 0
        for a in range(config.grad_accum):
            idx = batch_rows(step * config.grad_accum + a)[rank::size]
            with autocast(pair_device, cast):
                pair = answer_pair(model, [train_set[i] for i in idx], pad_id,
                                   groups is not None, config.prefix_grad,
                                   normalise=config.mass_weight > 0)  # fmt: skip
            targets = label_targets([train_labels[i] for i in idx]).to(pair.device)
            loss = answer_loss(pair, targets, config.mass_weight)
            opt.backward(loss)
            loss_sum += float(loss.detach())
            correct += int((pair.argmax(-1) == targets).sum())
            seen += len(idx)
        loss_sum, correct, seen = sum_scalars([loss_sum / size, correct, seen])
        grad_norm = opt.step(guard)
        step += 1
        if on_step is not None:
            on_step(step, model)
        record = {
            "step": step,
            "epoch": step * config.grad_accum * config.batch_size / len(train_set),
            "loss": loss_sum / config.grad_accum,
            "accuracy": correct / seen,
            "lr": opt.lr(),
            "grad_norm": grad_norm,
            "examples_per_s": seen / (time.perf_counter() - t0),
        }
        if step % config.eval_every == 0 or step == n_steps:
            val_acc, val_loss = validate(
                model, val_set, val_labels, pad_id, config.batch_size * 2, cast, config.mass_weight
            )
            record.update(val_accuracy=val_acc, val_loss=val_loss)
            if val_acc > best_acc:
                best_acc, best_step = val_acc, step
                opt.export(tok, run_dir / "best", meta(step, val_acc, val_loss))
        if writer:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % config.save_every == 0 or step == n_steps:
            state = {"step": step, "best_acc": best_acc, "best_step": best_step}
            saved = opt.save(run_dir, step, state)
            if saved is not None:
                prune_checkpoints(run_dir, config.keep_checkpoints)
                last_good = saved
            barrier()
            if on_save is not None:
                on_save(step, saved, record)
        if show is not None:
            show(step, n_steps)

    result = TrainResult(run_dir, step, best_step, best_acc, val_acc, val_loss)
    opt.export(tok, run_dir / "final", meta(step, val_acc, val_loss))
    if writer:
        ran = {"dtype": dtype_name(compute), "weights_dtype": weights_dtypes(model)}
        write_json(run_dir / "metrics.json", asdict(result) | ran)  # run_dir: a string
    barrier()
    return result


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from, so no step is logged twice."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    write_text(path, "".join(line + "\n" for line in keep))
