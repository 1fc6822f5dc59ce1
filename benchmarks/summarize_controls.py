"""Collect a `plans/controls.yaml` run into one JSON: every control's metrics per model, the
report's verdict rows, B1 across seeds, and the wall time.

    python benchmarks/summarize_controls.py runs/controls \
        --out benchmarks/results/controls_cpu.json --wall-s 3012 --device "2-core CPU"

Numbers are copied from the stages' metrics.json files, never recomputed, except the verdict
rows and the across-seeds figures, which are the report's own functions over the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from introspect.control_verdicts import (
    answer_pair_rows,
    b1_held_out,
    family_rows,
    input_rows,
    probe_rows,
    side_effect_rows,
    susceptibility_rows,
)
from introspect.replicates import across_seeds, replicate_groups
from introspect.report import _stage_dirs

B1_KEYS = ("accuracy", "tpr", "fpr", "d_prime", "auroc", "n_steered", "n_unsteered", "ci",
           "excluded", "n_rows")  # fmt: skip
KEEP = {  # per suite: the metrics.json keys worth keeping
    "yes-bias": ("verdict", "categories", "overall", "excluded", "n_rows", "p_yes_auroc",
                 "logit_probe"),
    "input-control": ("verdict", "conditions", "excluded", "n_trials"),
    "side-effects": ("verdict", "capability", "self_attribution", "self_attribution_all",
                     "excluded"),
    "susceptibility": ("verdict", "overall", "kl", "kl_by_factor", "n_concepts"),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wall-s", type=float, help="the plan's measured wall time")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    root = args.run_root
    plan = json.loads((root / "plan.json").read_text())
    dirs = _stage_dirs(root, plan)
    out: dict = {"plan": "plans/controls.yaml", "device": args.device, "wall_s": args.wall_s,
                 "dtype": plan.get("resources", {}).get("dtype"), "stages": {}}  # fmt: skip
    evals: dict[str, dict] = {}
    for name, s in plan["stages"].items():
        if s["kind"] != "eval" or name not in dirs:
            continue
        for m in s["models"]:
            f = dirs[name] / m / "metrics.json"
            if not f.exists():
                continue
            metrics = json.loads(f.read_text())
            if s["suite"] == "detection":
                evals.setdefault(name, {})[m] = metrics
                kept = {t: {k: v.get(k) for k in B1_KEYS} for t, v in metrics["tiers"].items()}
                if "food" in metrics:
                    kept["food"] = {k: metrics["food"].get(k) for k in B1_KEYS}
                entry = {"answers": metrics.get("answers", "yes-no"), "tiers": kept}
            else:
                entry = {k: metrics[k] for k in KEEP.get(s["suite"], ()) if k in metrics}
            out["stages"].setdefault(name, {"suite": s["suite"], "models": {}})
            out["stages"][name]["models"][m] = entry
    b1 = b1_held_out(plan, dirs)
    pair_rows, _ = answer_pair_rows(plan, b1)
    fam_rows, _ = family_rows(plan, b1)
    rows = pair_rows + fam_rows + probe_rows(plan, dirs, b1) + input_rows(plan, dirs)
    out["verdicts"] = rows + side_effect_rows(plan, dirs) + susceptibility_rows(plan, dirs)
    out["across_seeds"] = {
        stage: {
            plan["stages"][g[0]].get("preset", g[0]): {"runs": g, "tiers": across_seeds(ev, g)}
            for g in replicate_groups(plan)
            if sum(m in ev for m in g) >= 2
        }
        for stage, ev in evals.items()
    }
    timings = {}
    for name in plan["stages"]:
        for t in (root / name).glob("*/**/timing.json") if name in dirs else []:
            timings[str(t.parent.relative_to(root))] = json.loads(t.read_text())["wall_s"]
    out["unit_wall_s"] = timings
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(out['stages'])} eval stages, {len(out['verdicts'])} verdicts")


if __name__ == "__main__":
    main()
