"""A detection-training run as a Ray Train job: Ray Data in, ``introspect.train`` inside.

The driver reads the examples file and hands it to Ray Data (tokenised in ``map_batches``, no
model needed), a ``TorchTrainer`` starts the workers, and each worker runs the same loop as a single
process (:func:`introspect.train.train_prompts`). The steered KV cache is computed inside the
worker because it must come from the model being trained, and at 32B it is ~50 MB per example:
shipping it through the object store would cost more than recomputing it.

Every worker reads the whole tokenised set (a few integers per row) and takes its share of each
global batch by rank, because data order is a function of (seed, step) alone: one worker
reproduces the single-process run step by step, and a restarted worker picks up exactly where
the failed one stopped.

Rank 0 writes the run directory on local disk; each checkpoint (weights, optimizer, log, best
export) is reported to Ray Train, which persists it under ``storage_path/name`` (a local path or
``s3://``). A failed worker group restarts from the last reported checkpoint
(``max_failures``, counting lost workers or nodes only: any other error stops at once); rerunning
a job with the same name and storage resumes the same way. When
the job ends the final run directory is copied to ``out``.

Full fine-tuning on GPUs runs under DeepSpeed ZeRO-3 (``deepspeed``; config derived from the
model's size and the GPUs by :mod:`pipelines.deepspeed_config`, docs/deepspeed.md); LoRA, and
full fine-tuning on CPU, average gradients over the workers as DDP does (gloo on CPU). Under
ZeRO-3 every worker reports its own shard of each checkpoint and Ray Train gathers them into
one checkpoint directory; a restarted worker copies back only its own shard.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from introspect.errors import IntrospectError
from introspect.io import write_json
from introspect.train_config import TrainConfig
from pipelines.failures import failure_line, is_lost

# Ray Data's tokenising tasks import this module to unpickle the tokeniser (a fresh process,
# for every training): what only the driver or the training workers use (the model code,
# ray.train.torch) is imported where it is used, which saved such a process ~2 s of CPU.

log = logging.getLogger(__name__)

# What a checkpoint reported to Ray holds besides the training state itself.
RUN_FILES = (
    "config.json",
    "log.jsonl",
    "metrics.json",
    "worker.json",
    "deepspeed.json",
    "best",
    "final",
)


@dataclass
class TrainJob:
    """One training run on a Ray cluster."""

    name: str  # unique per run: the Ray Train run name under storage_path
    model: str
    train_data: str  # examples file (.parquet or .jsonl)
    val_data: str
    vectors: list[str]  # vector files; a set is named by its file's stem
    config: TrainConfig = field(default_factory=TrainConfig)
    storage_path: str = "runs/ray"  # local directory or s3://bucket/prefix
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    dtype: str | None = None  # default: bf16 on GPU, fp32 on CPU
    max_failures: int = 2
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on GPU
    worker_env: dict | None = None  # runtime_env of the training workers (env_vars, setup hook)
    # DeepSpeed ZeRO-3; None: on for method "full" with use_gpu, off otherwise (DDP).
    deepspeed: bool | None = None
    offload: str = "auto"  # ZeRO-3 CPU offload: auto, none, optimizer, optimizer+params

    def uses_deepspeed(self) -> bool:
        """Whether this job trains under ZeRO-3; errors name the field to change."""
        on = self.deepspeed
        if on is None:
            on = self.config.method == "full" and self.use_gpu
        from pipelines.deepspeed_config import OFFLOADS

        if self.offload != "auto" and self.offload not in OFFLOADS:
            raise IntrospectError(
                f"offload: {self.offload!r} must be 'auto' or one of {', '.join(OFFLOADS)}"
            )
        if not on:
            return False
        if self.config.method != "full":
            raise IntrospectError(
                "deepspeed: ZeRO-3 is wired for method 'full'; LoRA trains with DDP "
                "(deepspeed: false)"
            )
        if not self.use_gpu and self.offload not in ("auto", "none"):
            raise IntrospectError(f"offload: {self.offload!r} offloads to the CPU; needs use_gpu")
        if importlib.util.find_spec("deepspeed") is None:
            raise IntrospectError(
                "deepspeed: full fine-tuning on GPUs runs under DeepSpeed ZeRO-3, which is not "
                "installed: pip install 'introspect[deepspeed]', or set deepspeed: false (DDP)"
            )
        return True


def example_dataset(path: str, model: str, info_prompt: str | None = None) -> ray.data.Dataset:
    """Examples read on the driver, validated, then tokenised in ``map_batches`` (tokenizer only).

    Read here rather than by Ray Data's parquet reader: the file is small (a few MB at 10,000
    rows), the driver can always read it, and the rows then live in the object store, so no
    reader task or footer-reading actor lands on a node whose loss would fail the training.
    (Ray 2.60's reader also starts an actor per file footer: minutes on a small box.) Only
    remote storage (``s3://...``) goes through Ray Data's reader.
    """
    from introspect.examples import read_examples

    if "://" in str(path):
        ds = ray.data.read_parquet(path)
    else:
        ds = ray.data.from_pandas(read_examples(path))
    # Light tasks (a fraction of a CPU): on a small cluster the training workers hold the CPUs
    # while the data streams in, and a whole-CPU tokeniser would wait for them forever.
    return ds.map_batches(
        _tokenise,
        fn_kwargs={"model": model, "info_prompt": info_prompt},
        batch_format="pandas",
        num_cpus=0.1,
    )


@functools.cache
def _tokenizer(model: str):
    from introspect.models import load_tokenizer

    return load_tokenizer(model)


def _tokenise(batch: pd.DataFrame, model: str, info_prompt: str | None) -> pd.DataFrame:
    """Ray Data UDF: the token-id columns, with the tokenizer loaded once per worker process."""
    from introspect.examples import tokenise_examples

    return tokenise_examples(_tokenizer(model), batch, info_prompt)


def _shard_frame(name: str) -> pd.DataFrame:
    parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_format="pandas"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _stage(run_dir: Path | None, checkpoint: Path) -> Path:
    """A directory holding what a restarted worker (or the driver) needs from this worker.

    Rank 0 adds the run's files (``run_dir``); under ZeRO-3 the other workers add only their
    shard, and Ray Train gathers every worker's directory into one checkpoint. Only rank 0's
    completion marker goes up: workers uploading the same file at once can garble it.
    """
    from introspect.checkpoints import COMPLETE

    stage = Path(tempfile.mkdtemp(prefix="introspect-report-"))
    for name in RUN_FILES if run_dir is not None else ():
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, stage / name)
        elif src.exists():
            shutil.copy2(src, stage / name)
    marker = shutil.ignore_patterns(COMPLETE) if run_dir is None else None
    shutil.copytree(checkpoint, stage / "checkpoints" / checkpoint.name, ignore=marker)
    return stage


def _report(record: dict, run_dir: Path, checkpoint: Path | None, rank: int) -> None:
    """Report metrics, with the checkpoint this worker wrote (None: metrics only)."""
    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if checkpoint is None:
        ray.train.report(metrics)
        return
    stage = _stage(run_dir if rank == 0 else None, checkpoint)
    try:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _restore(checkpoint: Checkpoint, run_dir: Path, rank: int) -> None:
    """Copy a reported checkpoint into ``run_dir``, leaving out other workers' ZeRO-3 shards.

    DeepSpeed reads only its own rank's files when the number of workers is unchanged.
    """
    mine = f"zero_pp_rank_{rank}_"

    def others(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith("zero_pp_rank_") and not n.startswith(mine)]

    with checkpoint.as_directory() as d:
        shutil.copytree(d, run_dir, dirs_exist_ok=True, ignore=others)


def _zero_updates(cfg: dict, lm, config: TrainConfig, run_dir: Path):
    """The DeepSpeed ZeRO-3 updates for this worker, with its config derived and recorded."""
    import psutil
    import torch

    from introspect.zero import ZeroUpdates
    from pipelines.deepspeed_config import GIB, ModelSize, deepspeed_config, memory_plan

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    model = lm.model
    own = (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    size = ModelSize(sum(p.numel() for p in model.parameters()), lm.d_model, max(own))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    plan = None
    if cfg["use_gpu"]:
        # The model is still on the host: ask the GPU Ray Train made this worker's default.
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
        plan = memory_plan(
            size,
            world,
            gpu_gib=gpu.total_memory / GIB,
            offload=cfg["offload"],
            dtype=dtype,
            gpus_per_node=ctx.get_local_world_size(),
            cpu_gib=psutil.virtual_memory().total / GIB,
        )
    ds_config = deepspeed_config(
        size,
        world,
        micro_batch=max(1, config.batch_size // world),
        grad_accum=config.grad_accum,
        lr=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        dtype=dtype,
        offload=plan.offload if plan else "none",
    )
    if ctx.get_world_rank() == 0:
        record = {"config": ds_config, "plan": asdict(plan) if plan else None}
        write_json(run_dir / "deepspeed.json", record)
    return functools.partial(ZeroUpdates, ds_config=ds_config)


def train_loop_per_worker(cfg: dict) -> None:
    """The Ray Train worker: build prompts, restore the last checkpoint, run the loop."""
    import torch

    from introspect.checkpoints import latest_checkpoint
    from introspect.examples import tokenised_prompts
    from introspect.models import load
    from introspect.train import TorchUpdates, TrainingDiverged, train_prompts
    from introspect.vectors import load_vectors

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    config = TrainConfig(**cfg["config"])
    device, dtype = "cpu", cfg["dtype"]
    if cfg["use_gpu"] and torch.cuda.is_available():
        device = f"cuda:{ctx.get_local_rank()}" if torch.cuda.device_count() > 1 else "cuda"
        dtype = dtype or "bfloat16"  # what load() picks on a GPU; said here, as we load on CPU
    if not cfg["use_gpu"]:
        # DeepSpeed picks its accelerator once per process; a CPU job on a GPU host stays on CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # ZeRO-3 partitions the weights from a host copy onto the GPU one tensor at a time.
    lm = load(cfg["model"], dtype=dtype, device="cpu" if cfg["deepspeed"] else device)
    vector_sets = {Path(p).stem: load_vectors(p) for p in cfg["vectors"]}
    train_df, val_df = _shard_frame("train"), _shard_frame("val")
    val_df = val_df.iloc[: config.val_max_examples]
    as_prompts = lambda df: tokenised_prompts(df, vector_sets, lm.n_layers, lm.d_model)  # noqa: E731

    run_dir = Path(tempfile.mkdtemp(prefix=f"introspect-{cfg['name']}-r{rank}-"))
    started = time.time()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        _restore(restored, run_dir, rank)
    resumed_from = latest_checkpoint(run_dir)
    updates = _zero_updates(cfg, lm, config, run_dir) if cfg["deepspeed"] else TorchUpdates
    try:
        result = train_prompts(
            lm,
            as_prompts(train_df),
            train_df["label"].tolist(),
            as_prompts(val_df),
            val_df["label"].tolist(),
            config,
            run_dir,
            resume=restored is not None,
            on_save=lambda step, ckpt, record: _report(record, run_dir, ckpt, rank),
            updates=updates,
        )
    except TrainingDiverged as e:
        # Not a worker failure to retry: the same data and state would diverge again.
        raise IntrospectError(str(e)) from None
    # Where and when rank 0 ran (placement checks, the cost record).
    placement = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "device": str(lm.device),
        "world_size": ctx.get_world_size(),
        "resumed_from": resumed_from.name if resumed_from else None,  # after a restart
        "started": started,
        "ended": time.time(),
    }
    write_json(run_dir / "worker.json", placement)
    final = {
        "step": result.steps,
        "val_accuracy": result.final_val_accuracy,
        "val_loss": result.final_val_loss,
        "finished": 1,  # not "done": Tune reads that key as "stop this trial now"
    }
    # The last checkpoint travels with the final report, so a rerun under the same name
    # restores a finished loop instead of starting over (every worker's shard under ZeRO-3).
    last = latest_checkpoint(run_dir) if rank == 0 or cfg["deepspeed"] else None
    _report(final, run_dir, last, rank)
    shutil.rmtree(run_dir, ignore_errors=True)


def job_datasets(job: TrainJob) -> dict[str, ray.data.Dataset]:
    """The job's training and validation sets, read and tokenised now (materialised).

    Up front, because on a small cluster, jobs running side by side can hold every CPU while a
    later job's data still needs a slice of one to stream; and because tasks started inside a
    Tune trial are confined to the trial's tiny placement group, a sweep tokenises on its driver
    and hands the result to every trial.
    """
    from introspect.data import default_prompts

    info = default_prompts()["info_prompt"] if job.config.info_prompt else None
    return {
        "train": example_dataset(job.train_data, job.model, info).materialize(),
        "val": example_dataset(job.val_data, job.model, info).materialize(),
    }


def run_train_job(
    job: TrainJob,
    out: str | os.PathLike,
    callbacks: list | None = None,
    datasets: dict[str, ray.data.Dataset] | None = None,
) -> dict:
    """Run ``job`` on the connected Ray cluster; copy the finished run into ``out``.

    Returns the run's metrics (``metrics.json``) plus wall time and worker-hours.
    """
    deepspeed = job.uses_deepspeed()
    out = Path(out)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    datasets = datasets or job_datasets(job)
    storage = job.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    cfg = {
        **asdict(job),
        "config": job.config.model_dump(include=set(TrainConfig.model_fields)),
        "storage_path": storage,
        "deepspeed": deepspeed,
    }
    cfg.pop("worker_env")  # may hold a callable; the workers get it through their runtime_env
    resources = {"CPU": job.cpus_per_worker} | ({"GPU": 1} if job.use_gpu else {})
    # NCCL only where this torch has it (a CPU build, or fake GPUs in tests, use gloo).
    import torch.distributed as dist

    backend = job.backend or ("nccl" if job.use_gpu and dist.is_nccl_available() else "gloo")
    from ray.train.torch import TorchConfig, TorchTrainer

    from introspect.checkpoints import replace_dir

    def trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=job.name,
                storage_path=storage,
                # Ray Train would retry every error; only a lost worker is retried (below).
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
                worker_runtime_env=job.worker_env,
            ),
            datasets=datasets,
            # Every worker sees the whole (tokenised) set, in file order: see the module docstring.
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_ordered()),
        )

    t0 = time.time()
    result, restarts = _fit(trainer, job)
    wall = time.time() - t0
    if result.checkpoint is None:
        raise IntrospectError(f"train job {job.name}: finished without reporting a checkpoint")
    # ZeRO-3 checkpoints (every worker's optimizer shard: ~16 bytes a parameter) stay in
    # storage, where a rerun resumes from them; out keeps the run's exports and logs.
    skip = shutil.ignore_patterns("checkpoints") if deepspeed else None
    metrics: dict = {}

    def copy_run(tmp: Path) -> None:
        with result.checkpoint.as_directory() as d:
            shutil.copytree(d, tmp, ignore=skip, dirs_exist_ok=True)
        metrics.update(json.loads((tmp / "metrics.json").read_text()))
        metrics.update(
            run_dir=str(out),
            wall_s=wall,
            num_workers=job.num_workers,
            worker_hours=wall * job.num_workers / 3600,
            gpu_hours=wall * job.num_workers / 3600 if job.use_gpu else 0.0,
            restarts=restarts,
        )
        write_json(tmp / "metrics.json", metrics)

    replace_dir(out, copy_run)  # a partial earlier copy (no metrics.json) is replaced
    return metrics


def _fit(trainer, job: TrainJob):
    """``trainer().fit()``, again after a lost worker or node, at most ``max_failures`` times.

    A new trainer under the same name and storage resumes from the last reported checkpoint.
    Any other error (a config error, a non-finite loss, a bug) would fail the same way again:
    it is raised at once. Returns the result and the number of restarts.
    """
    for restarts in range(job.max_failures + 1):
        try:
            result = trainer().fit()
            error = result.error
        except Exception as e:  # noqa: BLE001 - classified below
            error = e
        if error is None:
            return result, restarts
        if not is_lost(error) or restarts == job.max_failures:
            raise error
        line = failure_line(error)
        log.warning("train job %s: %s; restarting from the last checkpoint", job.name, line)
        time.sleep(min(30.0, 2.0**restarts))  # let Ray notice the dead node first
    raise AssertionError("unreachable")


def _ordered():
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options
