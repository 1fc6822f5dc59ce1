"""The GPU path, measured: random weights at the plans' architectures, no downloads.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_<device>.json   # ~10 min, 1 GPU
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json              # CPU, seconds

Five checks, each a JSON entry with its goal and whether it was met:

1. ``scoring``: bf16 steer-then-remove scoring, batched (32) against a per-example loop, at the
   Qwen2.5-7B architecture. Goal >= 4x.
2. ``lora_training``: LoRA detection training at 7B: tokens/s and MFU. Goal >= 40 % MFU.
3. ``memory_32b``: one LoRA step at the Qwen2.5-32B architecture, batch 8, gradient
   checkpointing: peak memory against ``introspect check``'s estimate. Goal within 15 % and
   under 80 GB.
4. ``zero3``: one ZeRO-3 full fine-tuning step on one GPU at 0.5B (Ray Train + DeepSpeed).
5. ``model_host``: a ModelHost on the GPU scores the same as the in-process model.

``--tiny`` runs every check at tiny-random's architecture on CPU (fp32), so the script is
exercised by the test suite; its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from introspect.data import DataConfig, make_examples, split
from introspect.detection import score_detection
from introspect.examples import (
    to_detection_examples,
    tokenise_examples,
    tokenised_prompts,
    write_examples,
)
from introspect.memory import GIB, TrainShape, arch, on_gpu, train_flops, train_memory
from introspect.models import LoadedModel, smollm2_tokenizer, tiny_config
from introspect.train import preset, train_prompts
from introspect.vectors import VectorSet, random_vectors, save_vectors

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def random_model(name: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """A model of ``name``'s architecture (shipped config) with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from introspect.memory import model_config

    raw = model_config(name) if name != "tiny-random" else tiny_config().to_dict()
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items()
                                                        if k != "model_type"})  # fmt: skip
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()
    tok = smollm2_tokenizer()  # its ids are valid in any larger vocabulary
    tok.pad_token = tok.pad_token or tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=name)


def examples(lm: LoadedModel, n: int, seed: int = 0):
    vs = VectorSet(random_vectors(lm.d_model, 20, seed), lm.name, "random", 10, name="random")
    config = DataConfig(n=n, seed=seed, magnitudes=[4.0, 8.0], magnitude_mode="absolute")
    return make_examples(config, lm.n_layers, vs), vs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_scoring(lm: LoadedModel, n: int) -> dict:
    df, vs = examples(lm, n)
    trials = to_detection_examples(df, {"random": vs}, lm.n_layers, lm.d_model)
    score_detection(lm.model, lm.tokenizer, trials[:8], batch_size=8)  # warm-up
    sync()
    t0 = time.perf_counter()
    batched = score_detection(lm.model, lm.tokenizer, trials, batch_size=32)
    sync()
    t_batched = time.perf_counter() - t0
    loop_n = min(len(trials), 64)
    t0 = time.perf_counter()
    single = score_detection(lm.model, lm.tokenizer, trials[:loop_n], batch_size=1)
    sync()
    t_loop = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(batched.p_yes[:loop_n], single.p_yes, strict=True))
    ratio = (len(trials) / t_batched) / (loop_n / t_loop)
    return {"rows_per_s_batched": len(trials) / t_batched, "rows_per_s_loop": loop_n / t_loop,
            "speedup": ratio, "goal": ">= 4x", "met": ratio >= 4,
            "max_p_yes_difference": diff}  # fmt: skip


def _train(lm: LoadedModel, steps: int, batch: int, checkpointing: bool, out: Path):
    df, vs = examples(lm, max(4 * batch, batch * steps // 2))
    tr, va = split(df, 0.1, 0)
    to = lambda d: tokenised_prompts(  # noqa: E731
        tokenise_examples(lm.tokenizer, d), {"random": vs}, lm.n_layers, lm.d_model
    )
    config = preset("original", max_steps=steps, batch_size=batch, warmup_steps=1,
                    eval_every=steps, save_every=steps, val_max_examples=batch,
                    gradient_checkpointing=checkpointing)  # fmt: skip
    prompts = to(tr)
    t0 = time.perf_counter()
    train_prompts(lm, prompts, tr["label"].tolist(), to(va), va["label"].tolist(), config, out)
    sync()
    wall = time.perf_counter() - t0
    tokens = sum(len(p.prefix_ids) + len(p.suffix_ids) for p in prompts[: steps * batch])
    tp = max(len(p.prefix_ids) for p in prompts)
    ts = max(len(p.suffix_ids) for p in prompts)
    return wall, tokens, tp, ts, config


def check_training(lm: LoadedModel, steps: int, batch: int, peak_tflops: float | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        wall, tokens, tp, ts, config = _train(lm, steps, batch, False, Path(d) / "run")
    shape = TrainShape(batch, tp, ts, 2 if lm.model.dtype == torch.bfloat16 else 4)
    flops = steps * batch * train_flops(arch(lm.name), shape)
    out = {"tokens_per_s": tokens / wall, "steps": steps, "batch": batch, "wall_s": wall,
           "model_flops_per_s": flops / wall, "goal": ">= 40% MFU"}  # fmt: skip
    if peak_tflops:
        out["mfu"] = flops / wall / (peak_tflops * 1e12)
        out["met"] = out["mfu"] >= 0.40
    return out


def check_memory(lm: LoadedModel, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _, _, tp, ts, _ = _train(lm, 1, batch, True, Path(d) / "run")
    w = 2 if lm.model.dtype == torch.bfloat16 else 4
    parts = train_memory(arch(lm.name), TrainShape(batch, tp, ts, w, checkpointing=True))
    estimate = on_gpu(parts) / GIB
    out = {"estimate_gib": estimate, "parts_gib": {k: v / GIB for k, v in parts.items()},
           "goal": "within 15% and under 80 GB"}  # fmt: skip
    if torch.cuda.is_available():
        # Reserved is what the device holds (allocator slack included); the context is apart.
        peak = torch.cuda.max_memory_reserved() / GIB + 1.0
        out.update(peak_gib=peak, error=estimate / peak - 1)
        out["met"] = abs(out["error"]) <= 0.15 and peak * GIB < 80e9
    return out


def check_zero3(name: str, use_gpu: bool, work: Path) -> dict:
    import ray

    from pipelines.train_job import TrainJob, run_train_job

    lm = random_model(name, "cpu", torch.float32)
    model_dir = work / "model"
    lm.model.save_pretrained(model_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(model_dir)
    df, vs = examples(lm, 40)
    tr, va = split(df, 0.2, 0)
    write_examples(tr, work / "train.parquet")
    write_examples(va, work / "val.parquet")
    save_vectors(work / "random.safetensors", vs)
    config = preset("original", method="full", max_steps=1, batch_size=4, warmup_steps=1,
                    eval_every=1, save_every=1, val_max_examples=4)  # fmt: skip
    job = TrainJob(name="zero3", model=str(model_dir), train_data=str(work / "train.parquet"),
                   val_data=str(work / "val.parquet"), vectors=[str(work / "random.safetensors")],
                   config=config, storage_path=str(work / "storage"), use_gpu=use_gpu,
                   deepspeed=True, max_failures=0)  # fmt: skip
    ray.init(address="local", num_cpus=2, num_gpus=1 if use_gpu else 0, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        metrics = run_train_job(job, work / "out")
        wall = time.perf_counter() - t0
        host = check_model_host(str(model_dir), use_gpu)
    finally:
        ray.shutdown()
    return {"zero3": {"steps": metrics["steps"], "wall_s": wall, "met": metrics["steps"] == 1},
            "model_host": host}  # fmt: skip


def check_model_host(model_dir: str, use_gpu: bool) -> dict:
    """A one-host pool's scores against the same model scored in this process."""
    import ray

    from actors.model_host import host_pool
    from introspect.examples import score_examples
    from introspect.models import load

    lm = load(model_dir, device="cuda" if use_gpu else "cpu")
    df, vs = examples(lm, 16)
    here = score_examples(lm, df, {"random": vs}, 8)
    with host_pool(model_dir, 1, num_cpus=1) as pool:
        there = ray.get(pool[0].call.remote(score_examples, df, {"random": vs}, 8))
    diff = float((here["p_yes"] - there["p_yes"]).abs().max())
    return {"max_p_yes_difference": diff, "goal": "equal (<= 1e-3 in bf16, 1e-5 fp32)",
            "met": diff <= (1e-3 if use_gpu else 1e-5)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny-random sizes")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    name = torch.cuda.get_device_name() if gpu else "cpu (tiny sizes)"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if gpu else None
    seven = "Qwen/Qwen2.5-7B-Instruct" if gpu else "tiny-random"
    big = "Qwen/Qwen2.5-Coder-32B-Instruct" if gpu else "tiny-random"
    small = "Qwen/Qwen2.5-0.5B-Instruct" if gpu else "tiny-random"
    results: dict = {"device": name, "torch": torch.__version__, "dtype": str(dtype)}
    t0 = time.perf_counter()
    lm = random_model(seven, device, dtype)
    results["scoring"] = check_scoring(lm, 256 if gpu else 32)
    results["lora_training"] = check_training(lm, 10 if gpu else 2, 8 if gpu else 4, peak)
    del lm
    if gpu:
        torch.cuda.empty_cache()
    lm = random_model(big, device, dtype)
    results["memory_32b"] = check_memory(lm, 8)
    del lm
    if gpu:
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as d:
        results.update(check_zero3(small, gpu, Path(d)))
    results["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
