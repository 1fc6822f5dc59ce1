"""Seed replicates: B1 figures as a mean across seeds with an interval, from a plan's results.

Two train stages are replicates when everything but their seeds is the same: the preset, the
training overrides other than ``seed``, and their data stages' fields other than ``seed``. A
plan runs a configuration under several seeds simply by listing it several times with different
seeds; no naming convention is needed. For each B1 stage, every group of two or more replicates
it evaluated gets each tier's accuracy, TPR, FPR, d′ and AUROC as the mean over seeds with a
Student-t 95 % interval (n seeds, n - 1 degrees of freedom: with three seeds it is wide, as it
should be), beside the per-seed values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from introspect.io import markdown_table, read_json

FIGURES = ("accuracy", "tpr", "fpr", "d_prime", "auroc")
BOUNDED = ("accuracy", "tpr", "fpr", "auroc")  # rates: their intervals are clipped to [0, 1]


def replicate_groups(plan: dict) -> list[list[str]]:
    """Train stages that differ only in their seeds, in plan order (groups of >= 2)."""
    stages = plan["stages"]
    groups: dict[str, list[str]] = {}
    for name, s in stages.items():
        if s["kind"] != "train":
            continue
        data = {k: v for k, v in stages.get(s["data"], {}).items() if k not in ("seed", "after")}
        overrides = {k: v for k, v in (s.get("overrides") or {}).items() if k != "seed"}
        key = json.dumps([s.get("preset"), overrides, data, s.get("vectors")], sort_keys=True)
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) >= 2]


def t_interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict:
    """Mean and Student-t 95 % interval over ``values`` (nan interval under two values; nan
    values, e.g. a run whose rows the mass filter all left out, are skipped), clipped to
    ``bounds`` when given."""
    from scipy import stats

    x = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "n": 0, "ci": [math.nan, math.nan]}
    mean = sum(x) / n
    if n < 2:
        return {"mean": mean, "n": 1, "ci": [math.nan, math.nan]}
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "n": n, "ci": [lo, hi]}


def across_seeds(evals: dict[str, dict], group: Sequence[str]) -> dict[str, dict]:
    """``{tier: {figure: t_interval}}`` over the group's models that ``evals`` holds."""
    present = [m for m in group if m in evals]
    tiers = list(evals[present[0]]["tiers"]) if present else []
    out = {}
    for tier in tiers:
        blocks = [evals[m]["tiers"][tier] for m in present if tier in evals[m]["tiers"]]
        out[tier] = {
            f: t_interval([b[f] for b in blocks], (0.0, 1.0) if f in BOUNDED else None)
            for f in FIGURES
        }
    return out


def _fmt(m: dict, digits: int) -> str:
    if not math.isfinite(m["ci"][0]):
        return f"{m['mean']:.{digits}f}"
    return f"{m['mean']:.{digits}f} [{m['ci'][0]:.{digits}f}, {m['ci'][1]:.{digits}f}]"


def seeds_markdown(plan: dict, dirs: dict[str, Path]) -> str | None:
    """The "across seeds" section for every B1 stage that evaluated a replicate group."""
    groups = replicate_groups(plan)
    parts = []
    for name, s in plan["stages"].items():
        if s["kind"] != "eval" or s["suite"] != "detection" or name not in dirs:
            continue
        evals = {}
        for m in s["models"]:
            if (dirs[name] / m / "COMPLETE").exists():
                evals[m] = read_json(dirs[name] / m / "metrics.json")
        rows = []
        for group in groups:
            present = [m for m in group if evals.get(m)]
            if len(present) < 2:
                continue
            preset = plan["stages"][present[0]].get("preset", present[0])
            for tier, figs in across_seeds(evals, present).items():
                label = f"{preset} × {len(present)} seeds"
                if figs["accuracy"]["n"] < len(present):
                    label += f" ({figs['accuracy']['n']} with rows past the mass filter)"
                per_seed = ", ".join(f"{evals[m]['tiers'][tier]['accuracy']:.3f}" for m in present)
                rows.append({"runs": label, "tier": tier,
                             "accuracy, mean [t 95% CI]": _fmt(figs["accuracy"], 3),
                             "TPR": _fmt(figs["tpr"], 3), "FPR": _fmt(figs["fpr"], 3),
                             "d′": _fmt(figs["d_prime"], 2), "AUROC": _fmt(figs["auroc"], 3),
                             "accuracy per seed": f"{per_seed} ({', '.join(present)})",
                             })  # fmt: skip
        if rows:
            parts += [f"### `{name}`: across seeds", "", markdown_table(rows, list(rows[0])), ""]
    if not parts:
        return None
    head = (
        "## B1 across seeds\n\nRuns that differ only in their seeds (data draw and training), "
        "as the mean over seeds with a Student-t 95 % interval (n − 1 degrees of freedom; rates' "
        "intervals clipped to [0, 1]); the per-seed numbers are the B1 table's rows.\n\n"
    )
    return head + "\n".join(parts)
