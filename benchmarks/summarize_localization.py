"""Collect plans/localization.yaml's Phase C stages into localization.json (issue 16's table).

Each question's row comes from the localize stage that trained it (one stage per question,
or one joint stage): the trained model's B7 accuracy on held-out vectors, sentences and
contexts, with its Wilson interval, beside the base model's zero-shot accuracy and the
answer-prior baseline on the same trials.
Usage: python benchmarks/summarize_localization.py RUN_DIR --out OUT.json [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

# localization.json's name for each B7 question
NAMES = {"layers": "layers", "strength": "strength", "sentence": "sentence", "concept": "concepts"}


def read_results(path: Path) -> pd.DataFrame | None:
    """A stage's results table, or None where it was not written."""
    return pd.read_parquet(path) if path.exists() else None


def all_rows(df: pd.DataFrame | None, question: str, min_mass: float = 0.0) -> dict | None:
    """Accuracy over the trials of ``question`` in a results table whose answer-token mass is
    at least ``min_mass`` (0: every trial)."""
    if df is None:
        return None
    df = df[(df["question"] == question) & (df["answer_mass"] >= min_mass)]
    return {"accuracy": float((df["label"] == df["predicted"]).mean()), "n": len(df),
            "mean_answer_mass": float(df["answer_mass"].mean())}  # fmt: skip


def stage_metrics(run_dir: Path) -> tuple[dict[str, dict], list[dict]]:
    """``{stage: metrics}`` of every localize stage at the plan's current hash, and the
    metrics of earlier configurations of those stages still on disk (other hashes)."""
    plan = json.loads((run_dir / "plan.json").read_text())
    current = json.loads((run_dir / "stages.json").read_text())
    out, earlier = {}, []
    for name, stage in plan["stages"].items():
        if stage.get("kind") != "localize":
            continue
        for found in sorted((run_dir / name).glob("*/metrics.json")):
            m = json.loads(found.read_text())
            m["dir"] = str(found.parent)
            if found.parent.name == current[name]:
                out[name] = m
            else:
                earlier.append({"stage": name, "hash": found.parent.name, "metrics": m})
    return out, earlier


def open_ended(run_dir: Path) -> dict:
    """B6's judges (keyword, MiniLM embedding) per model, on the held-out concepts."""
    current = json.loads((run_dir / "stages.json").read_text())
    out = {}
    for found in sorted((run_dir / "b6" / current.get("b6", "-")).glob("*/metrics.json")):
        m = json.loads(found.read_text())["overall"]
        judges = ("keyword_steered", "keyword_control", "embedding_steered", "embedding_control")
        out[found.parent.name] = {k: m[k] for k in judges}
    return out


def row(after: dict, before: dict | None, stage: str, training: dict) -> dict:
    acc = after["accuracy"]
    out = {
        "accuracy": acc["rate"],
        "ci": acc["ci"],
        "chance": after["chance"],
        "n": acc["n"],
        "n_options": after["n_options"],
        # None where the mass filter left no base row (the every-row figure is beside it)
        "base_accuracy": before["accuracy"]["rate"] if before and before["accuracy"]["n"] else None,
        "base_ci": before["accuracy"]["ci"] if before and before["accuracy"]["n"] else None,
        "base_n": before["accuracy"]["n"] if before else 0,
        "prior_accuracy": after["prior_accuracy"]["rate"],
        "excluded_low_mass": after["excluded"],
        "mean_answer_mass": after["mean_answer_mass"],
        "stage": stage,
        "steps": training["steps"],
        "train_seconds": training["seconds"],
        "best_val_accuracy": training["best_val_accuracy"],
    }
    for k in ("mutual_information_bits", "mutual_information_shuffled_bits", "n_concepts"):
        if k in after:
            out[k] = after[k]
    if before and "mutual_information_bits" in before:
        out["base_mutual_information_bits"] = before["mutual_information_bits"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the plan's run directory (runs/localization)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, help="also write the README's table")
    parser.add_argument("--wall-s", type=float, help="the plan's measured wall time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", help="how the wall time was measured, kept in the JSON")
    parser.add_argument(
        "--base-dir",
        type=Path,
        help="zero-shot B7 of the base model with min_mass 0, one directory per stage holding "
        "results.parquet (for runs made before Phase C kept results_base.parquet)",
    )
    args = parser.parse_args()
    goals = {"layers": 0.90, "strength": 0.80, "sentence": 0.85, "concepts": 0.70}
    result: dict = {"model": "smollm2-135m", "device": args.device, "wall_s": args.wall_s,
                    "wall_note": args.note, "goals": goals, "questions": {},
                    "runs": {}}  # fmt: skip
    current, earlier = stage_metrics(args.run_dir)
    for stage, m in current.items():
        asked = list(m["after"])
        result["runs"][stage] = {"questions": asked, "training": m["training"]}
        trained = read_results(Path(m["dir"]) / "results.parquet")
        base_path = Path(m["dir"]) / "results_base.parquet"
        if not base_path.exists() and args.base_dir:
            base_path = args.base_dir / stage / "results.parquet"
        base = read_results(base_path)
        for q in asked:
            entry = row(m["after"][q], (m.get("before") or {}).get(q), stage, m["training"])
            # The rates above use the stage's mass filter; every trial's answer here.
            entry["all_rows"] = all_rows(trained, q)
            entry["base_all_rows"] = all_rows(base, q)
            # The rows a yes/no table's mass filter would keep (answer mass >= 0.5).
            entry["mass_filtered"] = all_rows(trained, q, 0.5)
            key = NAMES[q]
            # A question asked by several runs (separate and joint): keep the better, list all.
            result.setdefault("all_runs", {}).setdefault(key, []).append(entry)
            if entry["accuracy"] > result["questions"].get(key, {}).get("accuracy", -1):
                result["questions"][key] = entry
    result["earlier_configurations"] = [
        {"stage": e["stage"], "hash": e["hash"],
         "config": {k: e["metrics"]["config"].get(k) for k in ("steer", "n_sentences", "n_train")},
         "train": e["metrics"]["config"].get("train"),
         "questions": {q: row(a, (e["metrics"].get("before") or {}).get(q), e["stage"],
                              e["metrics"]["training"]) for q, a in e["metrics"]["after"].items()}}
        for e in earlier
    ]  # fmt: skip
    if "concepts" in result["questions"]:
        result["questions"]["concepts"]["open_ended"] = open_ended(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = [
            "| question | options | trained [95% CI] (n) | base zero-shot [95% CI] | prior "
            "| chance | goal | trained, answer mass >= 0.5 (n) |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def every(r: dict | None) -> str:
            return "n/a" if r is None else f"{r['accuracy']:.3f} ({r['n']})"

        for key, e in result["questions"].items():
            lo, hi = e["ci"]
            base = "n/a"
            if e["base_accuracy"] is not None:
                blo, bhi = e["base_ci"]
                base = f"{e['base_accuracy']:.3f} [{blo:.3f}, {bhi:.3f}]"
            extra = ""
            if "mutual_information_bits" in e:
                extra = f"; MI {e['mutual_information_bits']:.2f} bits"
                if "base_mutual_information_bits" in e:
                    extra += f" (base {e['base_mutual_information_bits']:.2f})"
            lines.append(
                f"| {key} | {e['n_options']} | {e['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"({e['n']}){extra} | {base} | {e['prior_accuracy']:.3f} | {e['chance']:.3f} "
                f"| {goals[key]:.2f} | {every(e['mass_filtered'])} |"
            )
        args.markdown.write_text("\n".join(lines) + "\n")
    print(json.dumps({k: round(v["accuracy"], 3) for k, v in result["questions"].items()}))


if __name__ == "__main__":
    main()
