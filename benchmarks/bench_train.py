"""Training throughput: batched steps vs the reference shape (batch 1 × accumulation 8).

Both sides run the same training loop (``introspect.train.train``) on the same model, data and
number of examples per optimizer step (8), differing only in how the 8 are fed: one micro-batch
of 8, or 8 micro-batches of 1. Each configuration runs ``--repeats`` times, interleaved, on a
fresh LoRA model; examples/s comes from the wall time of the whole run (checkpoints and
validation switched off by setting their interval past the last step).

    python benchmarks/bench_train.py --out benchmarks/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from introspect import models
from introspect.data import DataConfig, make_examples, split
from introspect.train import preset, train
from introspect.vectors import VectorSet, random_vectors


def run_once(
    model: str, dtype: str, data, vs, batch_size: int, grad_accum: int, steps: int
) -> float:
    lm = models.load(model, dtype=dtype)
    config = preset(
        "original",
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=steps,
        eval_every=10**9,
        save_every=10**9,
        warmup_steps=1,
        val_max_examples=1,
    )
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        train(lm, *data, {vs.name: vs}, config, Path(d) / "run")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of 8 examples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_cpu.json"))
    args = parser.parse_args()

    n_layers, d_model = models.dims(args.model)
    vs = VectorSet(random_vectors(d_model, 20, 0), args.model, "random", 10, name="bench")
    data = split(
        make_examples(DataConfig(n=400, seed=0, magnitude_mode="absolute"), n_layers, vs),
        0.05,
        seed=0,
    )
    shapes = {"batched_8x1": (8, 1), "per_example_1x8": (1, 8)}
    run_once(args.model, args.dtype, data, vs, 8, 1, 1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in shapes}
    for _ in range(args.repeats):
        for name, (bs, accum) in shapes.items():
            times[name].append(run_once(args.model, args.dtype, data, vs, bs, accum, args.steps))
    examples = 8 * args.steps
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "detection training (LoRA r16 on q,k,v,o)",
        "model": args.model,
        "dtype": args.dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "examples_per_run": examples,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": med,
        "examples_per_s": {k: examples / v for k, v in med.items()},
        "speedup_batched_vs_per_example": med["per_example_1x8"] / med["batched_8x1"],
        "goal_speedup_min": 4.0,
        "note": "run time includes model load (~0.2 s from the converted cache) and LoRA set-up",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ("examples_per_s", "speedup_batched_vs_per_example")
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
