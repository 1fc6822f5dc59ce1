"""Collect the B1 metrics and training summaries of benchmarks/detection_runs.sh into one JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The B1 numbers kept per tier, in this order.
TIER_KEYS = (
    "accuracy",
    "tpr",
    "fpr",
    "d_prime",
    "auroc",
    "n_steered",
    "n_unsteered",
    "ci",
    "mean_p_yes_steered",
    "mean_p_yes_unsteered",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, help="also write the README's comparison table")
    parser.add_argument("--dtype", default="float32", help="the dtype the runs used")
    parser.add_argument(
        "--compare", type=Path, help="another dtype's summary: is each accuracy in its interval?"
    )
    args = parser.parse_args()
    root = args.run_root
    result: dict = {"model": "smollm2-135m", "device": "cpu", "dtype": args.dtype, "models": {}}
    for eval_dir in sorted((root / "eval").glob("*/metrics.json")):
        name = eval_dir.parent.name
        metrics = json.loads(eval_dir.read_text())
        entry = {"tiers": {t: {k: m[k] for k in TIER_KEYS} for t, m in metrics["tiers"].items()}}
        if "food" in metrics:
            entry["food_task"] = {
                k: metrics["food"][k] for k in ("accuracy", "n_steered", "n_unsteered", "ci")
            }
        train = root / "train" / name
        if (train / "metrics.json").exists():
            training = entry["training"] = json.loads((train / "metrics.json").read_text())
            training["config"] = json.loads((train / "config.json").read_text())
            log = [json.loads(x) for x in (train / "log.jsonl").read_text().splitlines()]
            training["val_curve"] = [
                (r["step"], r["val_accuracy"]) for r in log if "val_accuracy" in r
            ]
            rates = sorted(r["examples_per_s"] for r in log)
            training["median_examples_per_s"] = rates[len(log) // 2]
        result["models"][name] = entry
    if args.compare:
        result["compared_with"] = compare(result, json.loads(args.compare.read_text()))
        result["compared_with"]["file"] = str(args.compare)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({len(result['models'])} models)")
    if args.markdown:
        args.markdown.write_text(markdown(result))


def compare(result: dict, other: dict) -> dict:
    """Per model and tier: is this run's accuracy inside the other run's 95 % interval?"""
    rows = {}
    for name, entry in result["models"].items():
        theirs = other["models"].get(name, {}).get("tiers", {})
        for tier, t in entry["tiers"].items():
            if tier in theirs:
                lo, hi = theirs[tier]["ci"]["accuracy"]
                rows[f"{name}/{tier}"] = {
                    "accuracy": t["accuracy"],
                    "other_accuracy": theirs[tier]["accuracy"],
                    "other_ci": [lo, hi],
                    "within": lo <= t["accuracy"] <= hi,
                }
    return {"dtype": other.get("dtype"), "tiers": rows}


ORDER = ["base", "original", "r1-minimal", "vague-prompt", "food-control", "flipped-labels"]


def markdown(result: dict) -> str:
    """One row per model × tier; for the food task 'steered/unsteered' means food/other."""
    lines = [
        "| model | tier | accuracy [95 % CI] | TPR | FPR | d′ | AUROC | n steered / unsteered |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = sorted(result["models"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    for name in names:
        entry = result["models"][name]
        tiers = list(entry["tiers"].items())
        for tier, t in tiers:
            lo, hi = t["ci"]["accuracy"]
            lines.append(
                f"| {name} | {tier} | {t['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {t['tpr']:.3f} | "
                f"{t['fpr']:.3f} | {t['d_prime']:.2f} | {t['auroc']:.3f} | "
                f"{t['n_steered']} / {t['n_unsteered']} |"
            )
        if "food_task" in entry:
            f = entry["food_task"]
            lo, hi = f["ci"]["accuracy"]
            lines.append(
                f"| {name} | food task | {f['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | | | | | "
                f"{f['n_steered']} food / {f['n_unsteered']} other |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
