"""Scoring throughput, measured side by side in one process (never asserted by tests).

1. Steering overhead: the same batches scored with per-row steering vs with no steering.
2. Batching: batched scoring (batch >= 16) vs a per-example loop (batch 1, the seed's shape).

Each configuration runs ``--repeats`` times, interleaved, after one warm-up; the JSON holds every
timing, the medians and the ratios of the medians.

    python benchmarks/bench_scoring.py --out benchmarks/results/scoring_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from introspect import models
from introspect.data import DataConfig, make_examples
from introspect.detection import build_prompt, score_detection
from introspect.examples import to_detection_examples
from introspect.vectors import VectorSet, random_vectors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64, help="examples per measurement")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scoring_cpu.json"))
    args = parser.parse_args()

    lm = models.load(args.model, dtype=args.dtype)
    vs = VectorSet(random_vectors(lm.d_model, 20, 0), args.model, "random", 20, name="bench")
    # Every row steered, so the overhead comparison steers all of them.
    config = DataConfig(
        n=4 * args.n, steered_fraction=1.0, magnitudes=[10.0], magnitude_mode="absolute", seed=0
    )
    df = make_examples(config, lm.n_layers, vs)
    # Distinct texts only: scoring shares the result of identical unsteered trials, which would
    # let the unsteered side do less work than the steered one.
    texts = ["context_prompt", "assistant_response", "detection_question"]
    df = df.drop_duplicates(texts).head(args.n).reset_index(drop=True)
    steered = to_detection_examples(df, {vs.name: vs}, lm.n_layers, lm.d_model)
    plain = [replace(e, steering=None) for e in steered]
    tokens = sum(
        len(p.prefix_ids) + len(p.suffix_ids)
        for p in (build_prompt(lm.tokenizer, e) for e in steered)
    )

    score = functools.partial(score_detection, lm.model, lm.tokenizer)
    runs = {
        "batched_steered": lambda: score(steered, args.batch_size),
        "batched_unsteered": lambda: score(plain, args.batch_size),
        "per_example_steered": lambda: score(steered, 1),
    }
    for fn in runs.values():  # warm-up: allocator, kernels, tokenizer caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "scoring",
        "model": args.model,
        "device": str(lm.device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(next(lm.model.parameters()).dtype),
        "n_examples": args.n,
        "tokens_per_pass": tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": med,
        "examples_per_s": {k: args.n / v for k, v in med.items()},
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "steering_overhead": med["batched_steered"] / med["batched_unsteered"] - 1.0,
        "batched_speedup_vs_per_example": med["per_example_steered"] / med["batched_steered"],
        "goals": {"steering_overhead_max": 0.05, "batched_speedup_min": 4.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ("examples_per_s", "steering_overhead", "batched_speedup_vs_per_example")
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
