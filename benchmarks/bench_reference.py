"""Our scoring and training vs a loop shaped like the reference's, side by side in one process.

Ours: ``score_detection`` (batches of 16 grouped by prefix, per-row steering masks, prefix pass
through the backbone only, each distinct prefix run once through its rows' first steered layers and
the tokens all prefixes of a batch start with (the chat template's system turn) once a batch, a
steered row's suffix run with its unsteered twin's through its first steered layer, the last
layer's MLP and the LM head on the answer position only, identical unsteered trials scored once)
and ``train`` (preset "original": LoRA r16/α32/0.05 on q,k,v,o, AdamW 2e-4, clip 1.0, one
micro-batch of 8 per optimizer step; the rows packed without their padding, ``introspect.packed``,
with the key/value heads handed to SDPA as they are on a CPU and the last layer's MLP run only at
the answer positions; the 2-way loss from the answer tokens' LM-head rows only; on a CPU the LoRA
dropout masks come from 16 random bits an element, ``introspect.dropout``).

Reference-shaped (written here from the documented shape, plain torch + transformers on the same
loaded LlamaForCausalLM): every trial alone (batch 1); forward hooks on decoder layers
[layer_start, layer_end) add magnitude * vector at every position of the prefix call; the prefix
goes through the full CausalLM (LM head on every position) under no_grad with use_cache; hooks
off; the DynamicCache is deep-copied; the suffix runs on the copy through the full CausalLM and
the last position's (" yes", " no") logits give P(yes) by a 2-way softmax. Training runs the same
two passes with the suffix under grad, 2-way cross-entropy, the same LoRA via peft, AdamW 2e-4,
batch 1 x accumulation 8 (loss / 8), clip 1.0. Both sides take their token ids from
``build_prompt`` (tokenising is inside both timings), so they see identical tokens.

Rows: scoring takes B1's trials (``detection_trials``: the in-distribution and held-out
tiers, each steered trial with its unsteered twin on the same context, reply and question;
relative magnitudes 0.05/0.1/0.2/0.3 of the residual norm measured in fp32), ``--n`` of them.
Training takes ``--train-examples`` rows of a 2,000-row detection data set (the benchmark's
size, ~20 rows per prefix), drawn as 2-prefix batches of 8; every side trains on those rows,
ours uniform (the default) and, on a third line, with ``contexts_per_batch: 2``. The same rows
in every dtype. Model loading happens outside every timer; a training timer
covers LoRA set-up, tokenising and the loop (ours also writes its final checkpoint and adapter and
validates one row, which only counts against ours). Each configuration gets one warm-up (scoring:
the first 16 rows; training: one optimizer step), then ``--repeats`` interleaved timed runs; the
medians are compared. "Each at its default": ours in ``--our-default`` vs the reference in
bfloat16 (the reference loads its model in bf16). A check: the max |p_yes(ours) - p_yes(ref)| per
dtype over the scored rows.

    python benchmarks/bench_reference.py --out benchmarks/results/reference_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import transformers

from introspect import models, precision
from introspect.activations import residual_norms
from introspect.data import RELATIVE_MAGNITUDES, DataConfig, default_prompts, make_examples
from introspect.detection import answer_token_ids, build_prompt, score_detection
from introspect.evals.detection import detection_trials
from introspect.examples import to_detection_examples
from introspect.train import grouped_batch, preset, train
from introspect.vectors import VectorSet, random_vectors

REFERENCE_DTYPE = "bfloat16"
ACCUM = 8
GOALS = {
    "scoring": {"default": 4.0, "same_dtype": 3.0},
    "training": {"default": 3.0, "same_dtype": 2.5},
}
UNIT = {"scoring": "rows_per_s", "training": "examples_per_s"}


# --------------------------------------------------------------------------- reference-shaped loop


def reference_logits(model, prompt) -> torch.Tensor:
    """Batch-1 steer-then-remove through the full CausalLM: ``[vocab]`` logits, last position."""
    lm = models.causal_lm(model)  # with LoRA injected, when wrapped by peft
    device, dtype = lm.device, lm.dtype
    handles = []
    if (s := prompt.steering) is not None:
        delta = (s.magnitude * s.vector.float()).to(device=device, dtype=dtype)

        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        layers = models.decoder_layers(lm)
        handles = [layers[i].register_forward_hook(hook) for i in range(s.layer_start, s.layer_end)]
    try:
        with torch.no_grad():
            out = lm(input_ids=torch.tensor([prompt.prefix_ids], device=device), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = copy.deepcopy(models.output_cache(lm, out))  # DynamicCache mutates in place
    suffix = torch.tensor([prompt.suffix_ids], device=device)
    return lm(input_ids=suffix, use_cache=True, **models.cache_kwargs(lm, cache)).logits[0, -1]


def reference_score(lm, examples) -> list[float]:
    yes, no = answer_token_ids(lm.tokenizer)
    p_yes = []
    for ex in examples:
        with torch.no_grad():
            logits = reference_logits(lm.model, build_prompt(lm.tokenizer, ex)).float()
        p_yes.append(float(logits[[yes, no]].softmax(-1)[0]))
    return p_yes


def reference_train(lm, examples, labels, steps: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(lm.model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, (steps - k) / steps))
    yes, no = answer_token_ids(lm.tokenizer)
    order = np.random.default_rng(0).permutation(len(examples))
    for step in range(steps):
        for i in order[step * ACCUM : (step + 1) * ACCUM]:
            pair = reference_logits(model, build_prompt(lm.tokenizer, examples[i]))[[yes, no]]
            target = torch.tensor([0 if labels[i] else 1])
            (F.cross_entropy(pair.float()[None], target) / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the measurement


def our_train(lm, train_df, val_df, vs, steps: int, contexts: int | None = None) -> None:
    config = preset(
        "original",
        contexts_per_batch=contexts,
        batch_size=ACCUM,
        grad_accum=1,
        max_steps=steps,
        eval_every=10**9,
        save_every=10**9,
        warmup_steps=1,
        val_max_examples=1,
    )
    with tempfile.TemporaryDirectory() as d:
        train(lm, train_df, val_df, {vs.name: vs}, config, Path(d) / "run")


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def row(cells: list) -> str:
    """A markdown table row; numbers to 2 decimals, a missing number (an error) as "error"."""
    text = [c if isinstance(c, str) else "error" if c is None else f"{c:.2f}" for c in cells]
    return "| " + " | ".join(text) + " |"


def max_diff(a: list[float] | None, b: list[float] | None) -> float | None:
    return None if a is None or b is None else max(abs(x - y) for x, y in zip(a, b, strict=True))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=96, help="rows scored per measurement")
    parser.add_argument("--train-examples", type=int, default=48, help="a multiple of 8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--our-default",
        default=precision.dtype_name(precision.default_dtype("cpu")),
        help="our default dtype (default: what introspect.precision picks on this CPU)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reference_cpu.json"))
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    steps = args.train_examples // ACCUM
    if steps < 1 or args.train_examples % ACCUM:
        parser.error(f"--train-examples: {args.train_examples} is not a positive multiple of 8")

    base = models.load(args.model, dtype="float32")
    vs = VectorSet(random_vectors(base.d_model, 20, 0), args.model, "random", 10, name="bench")
    norms = residual_norms(base, default_prompts()["context_prompts"])
    # Scoring: B1's trials (two tiers, each steered trial with its unsteered twin), what
    # scoring is for. Training: rows of a detection data set of the benchmark's size (2,000
    # rows, ~20 per prefix), drawn as 2-prefix batches of 8 so that the prefix-sharing variant
    # can group them too; every side trains on these same rows.
    score_df = detection_trials(
        base.n_layers,
        vs,
        n_per_tier=args.n // 4,
        magnitudes=RELATIVE_MAGNITUDES,
        magnitude_mode="relative",
        norms=norms,
        seed=0,
    )
    config = DataConfig(n=2000, seed=0, magnitude_mode="relative", magnitudes=RELATIVE_MAGNITUDES)
    df = make_examples(config, base.n_layers, vs, norms=norms)
    prefixes = list(zip(df["context_prompt"], df["assistant_response"], strict=True))
    groups = pd.Series(range(len(df))).groupby(pd.Series(prefixes).astype(str)).agg(list)
    picked = np.concatenate([grouped_batch(groups.tolist(), ACCUM, 2, 0, k) for k in range(steps)])
    train_df = df.iloc[picked].reset_index(drop=True)
    val_df = df.drop(index=picked).iloc[:1].reset_index(drop=True)
    rows, train_rows = (
        to_detection_examples(d, {vs.name: vs}, base.n_layers, base.d_model)
        for d in (score_df, train_df)
    )
    labels = train_df["label"].tolist()
    del base

    scorers = {dt: models.load(args.model, dtype=dt) for dt in dtypes}

    def run(work: str, dtype: str, side: str, warm: bool):
        """One timed run; returns (seconds, p_yes or None). Loading stays outside the timer."""
        if work == "scoring":
            lm, ex = scorers[dtype], rows[:16] if warm else rows
            if side == "ours":
                return timed(lambda: score_detection(lm.model, lm.tokenizer, ex, 16).p_yes)
            return timed(lambda: reference_score(lm, ex))
        lm, n = models.load(args.model, dtype=dtype), 1 if warm else steps
        if side.startswith("ours"):
            contexts = 2 if side == "ours_shared_prefixes" else None
            return timed(lambda: our_train(lm, train_df, val_df, vs, n, contexts))[0], None
        return timed(lambda: reference_train(lm, train_rows, labels, n))[0], None

    configs = [(w, dt, s) for w in UNIT for dt in dtypes for s in ("ours", "reference")]
    # Training also with batches of 2 prefixes x 4 steerings (contexts_per_batch: 2).
    configs += [("training", dt, "ours_shared_prefixes") for dt in dtypes]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    errors: dict[tuple, str] = {}
    p_yes: dict[tuple, list[float]] = {}
    for warm in [True] + [False] * args.repeats:  # one warm-up each, then interleaved repeats
        for c in configs:
            if c in errors:
                continue
            try:
                seconds, out = run(*c, warm)
            except Exception as e:  # e.g. training in bf16 not supported yet: report, go on
                errors[c] = f"{type(e).__name__}: {e}"
                continue
            if not warm:
                times[c].append(seconds)
                if out is not None:
                    p_yes[c] = out

    result: dict = {"scoring": {}, "training": {}}
    for work, dt, side in configs:
        size = args.n if work == "scoring" else args.train_examples
        entry = {"seconds": times[(work, dt, side)]}
        if (work, dt, side) in errors:
            entry["error"] = errors[(work, dt, side)]
        elif entry["seconds"]:
            entry["median_seconds"] = statistics.median(entry["seconds"])
            entry[UNIT[work]] = size / entry["median_seconds"]
        result[work].setdefault(dt, {})[side] = entry
    rate = lambda work, dt, side: result[work].get(dt, {}).get(side, {}).get(UNIT[work])  # noqa: E731
    lines = ["| work | dtype | ours | reference-shaped | ratio |", "|---|---|---|---|---|"]
    met: dict[str, bool | None] = {}
    for work in UNIT:
        for dt in dtypes:
            r = ratio(rate(work, dt, "ours"), rate(work, dt, "reference"))
            result[work][dt]["ratio_ours_vs_reference"] = r
            met[f"{work}_same_dtype_{dt}"] = None if r is None else r >= GOALS[work]["same_dtype"]
            cells = [f"{work} ({UNIT[work]})", dt, rate(work, dt, "ours")]
            lines.append(row(cells + [rate(work, dt, "reference"), r]))
            if work == "training":  # the optional batches by prefix, beside the default
                shared = rate(work, dt, "ours_shared_prefixes")
                r = ratio(shared, rate(work, dt, "reference"))
                result[work][dt]["ratio_shared_prefixes_vs_reference"] = r
                cells = [f"{work}, contexts_per_batch 2 ({UNIT[work]})", dt, shared]
                lines.append(row(cells + [rate(work, dt, "reference"), r]))
        ours, ref = rate(work, args.our_default, "ours"), rate(work, REFERENCE_DTYPE, "reference")
        r = ratio(ours, ref)
        result[work]["default_ratio"] = r
        met[f"{work}_default"] = None if r is None else r >= GOALS[work]["default"]
        at = f"defaults: ours {args.our_default}, reference {REFERENCE_DTYPE}"
        # A dtype left out of --dtypes (bf16 on a CPU without native bf16) was not run.
        cells = [x if d in dtypes else f"not run ({d})" for x, d in
                 ((ours, args.our_default), (ref, REFERENCE_DTYPE))]  # fmt: skip
        lines.append(row([f"{work} ({UNIT[work]})", at, *cells, r if r else "-"]))
    ref32 = p_yes.get(("scoring", "float32", "reference"))
    for dt in dtypes:
        ours, ref = p_yes.get(("scoring", dt, "ours")), p_yes.get(("scoring", dt, "reference"))
        result["scoring"][dt]["max_abs_p_yes_diff"] = max_diff(ours, ref)
        if dt != "float32":  # how far this dtype moves p_yes at all: the scale of the above
            moved = {"ours": max_diff(ours, ref32), "reference": max_diff(ref, ref32)}
            result["scoring"][dt]["max_abs_p_yes_diff_vs_reference_float32"] = moved
    markdown = "\n".join(lines)
    result = {
        "benchmark": "ours vs reference-shaped (batch 1, full LM head, cache deep-copy)",
        "model": args.model,
        "device": str(scorers[dtypes[0]].device),
        "cpu": cpu_model(),
        # Without native bf16 (AVX2 only), bf16 matmuls are emulated and many times slower
        # than fp32; with AVX512-BF16 but no AMX they are still slower. Our default is then
        # fp32 (introspect.precision), the reference's stays bf16.
        "cpu_native_bf16": precision.native_bf16_cpu(),
        "cpu_amx": precision.amx_cpu(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "n_rows": args.n,
        "n_steered_rows": int(score_df["steered"].sum()),
        "train_examples": args.train_examples,
        "optimizer_steps": steps,
        "repeats": args.repeats,
        "dtypes": dtypes,
        "our_default_dtype": args.our_default,
        "reference_default_dtype": REFERENCE_DTYPE,
        "magnitudes": {"mode": "relative", "factors": RELATIVE_MAGNITUDES},
        "score_detection_has_share_prefixes": "share_prefixes"
        in inspect.signature(score_detection).parameters,
        **result,
        "goals": GOALS,
        "goals_met": met,
        "markdown": markdown,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown)
    diffs = {dt: {k: v for k, v in result["scoring"][dt].items() if "p_yes" in k} for dt in dtypes}
    errs = {"/".join(c): e for c, e in errors.items()}
    print(json.dumps({"max_abs_p_yes_diff": diffs, "goals_met": met, "errors": errs}, indent=2))


if __name__ == "__main__":
    main()
