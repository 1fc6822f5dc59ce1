"""Seed 002's "What success looks like", answered from a plan's results on disk.

Six criteria, each with a verdict (yes / no / not measured), its numbers with 95 % intervals and
what was compared. The rules are stated once, in :data:`RULES`, which the report prints as the
table's caption. Numbers come from the eval units' ``metrics.json`` (B1, B5, B7) and the
training runs' ``run/metrics.json``; B2's comparisons between two models are paired by question,
so they read the per-question ``results.parquet`` that the B2 unit wrote beside its metrics.
Whatever a plan did not produce gives "not measured (why)", never an error.

Models are found by their train stage's ``preset`` (``original``, ``vague-prompt``, ...), not by
the stage's name; ``base`` is the untrained model of an eval stage's ``models`` list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from introspect.io import cell, markdown_table, read_json

BASE = "base"
B1_CHANCE = 0.5  # yes/no detection, balanced steered and unsteered trials
NEAR_CHANCE = 0.1  # flipped-labels: a validation accuracy below 0.5 + this is "near chance"
SUITES = {"detection": "B1", "behavioral": "B2", "calibration": "B5", "localization": "B7"}

RULES = (
    "Rules. *B2 effect* of model A over model B: the mean, over B2's self-attribution questions "
    "(categories `self_*`) that both models answer (yes+no mass at or above B2's `min_mass`), "
    "of the per-question difference P_A(yes) − P_B(yes), with a percentile-bootstrap 95 % "
    "interval over questions (as B2's own intervals). "
    "*No bias*: the food-control − base interval contains 0. "
    "*Similar*: the vague-prompt − original interval contains 0. "
    "*Detects*: the Wilson 95 % interval of B1 held-out accuracy lies above 0.5. "
    "*Does not converge*: no measure is above chance — B1 held-out accuracy's interval does not "
    f"lie above 0.5, and the final validation accuracy (a point value: training keeps no "
    f"interval) is below {B1_CHANCE + NEAR_CHANCE:.1f}; either alone decides when the other is "
    "missing. *Improves*: the original run's mean KL(sampled ‖ reported) in B5 has a bootstrap "
    "interval entirely below the base model's. *Signal*: some question's B7 accuracy, for some "
    "model, has a Wilson interval above its chance (1/3). "
    "'No bias' and 'similar' rest on an interval containing 0, which a small run's wide "
    "interval does easily: read the widths."
)


@dataclass(frozen=True)
class Verdict:
    """One criterion's row: ``verdict`` is "yes", "no" or "not measured (why)"."""

    criterion: str
    verdict: str
    numbers: str = ""
    compared: str = ""


def _complete(path: Path) -> bool:
    return (path / "COMPLETE").exists()


def _finite(ci) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) for x in ci)


def _fmt(mean: float, ci, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _model(plan: dict, who: str) -> str | None:
    """The eval-model name of ``who``: ``base``, or the first train stage with that preset."""
    if who == BASE:
        return BASE
    trained = [
        n for n, s in plan["stages"].items() if s["kind"] == "train" and s.get("preset") == who
    ]
    return trained[0] if trained else None


def measured(
    plan: dict, dirs: dict[str, Path], suite: str, *who: str
) -> tuple[str, dict[str, Path]] | str:
    """The first ``suite`` eval stage in which every one of ``who`` (``base`` or presets) has a
    finished result: ``(stage, {who: unit directory})``; else why not, in words."""
    label = SUITES.get(suite, suite)
    names = {}
    for w in who:
        names[w] = _model(plan, w)
        if names[w] is None:
            return f"the plan has no train stage with preset {w}"
    stages = [n for n, s in plan["stages"].items() if s["kind"] == "eval" and s["suite"] == suite]
    if not stages:
        return f"the plan has no {label} stage"
    planned = [n for n in stages if all(m in plan["stages"][n]["models"] for m in names.values())]
    if not planned:
        return f"no {label} stage evaluates {' and '.join(names.values())}"
    for n in planned:
        if n in dirs and all(_complete(dirs[n] / m) for m in names.values()):
            return n, {w: dirs[n] / m for w, m in names.items()}
    n = planned[0]
    missing = [m for m in names.values() if n not in dirs or not _complete(dirs[n] / m)]
    return f"{label} `{n}` has no finished result for {', '.join(missing)}"


def self_attribution_effect(model_dir: Path, ref_dir: Path) -> dict | None:
    """B2 effect of one model over another: per-question P(yes) differences on the
    self-attribution questions that both kept (the mass filter), paired by question key.
    ``{"mean", "n", "ci"}`` (percentile bootstrap over questions); None when either unit has no
    per-question results."""
    import pandas as pd

    from introspect.evals.common import mean_ci

    if not (model_dir / "results.parquet").exists() or not (ref_dir / "results.parquet").exists():
        return None
    a = pd.read_parquet(model_dir / "results.parquet")
    b = pd.read_parquet(ref_dir / "results.parquet")
    # Questions the mass filter left out of either model's B2 are left out of the pair too.
    a, b = (d[d["kept"]] if "kept" in d.columns else d for d in (a, b))
    both = a[["key", "category", "p_yes"]].merge(
        b[["key", "p_yes"]], on="key", suffixes=("", "_ref")
    )
    both = both[both["category"].str.startswith("self")]
    return mean_ci((both["p_yes"] - both["p_yes_ref"]).tolist())


def _held_out(unit: Path) -> dict | None:
    """B1's held-out tier (random vectors never trained on) of one unit, if it has one."""
    return ((read_json(unit / "metrics.json") or {}).get("tiers") or {}).get("held_out")


def _b1_text(held: dict) -> str:
    n = held["n_steered"] + held["n_unsteered"]
    return f"B1 held-out accuracy {_fmt(held['accuracy'], held['ci']['accuracy'])} (n = {n})"


def food_no_bias(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """food-control's B2 effect over base contains 0."""
    crit = "food-control shows no self-attribution bias (B2)"
    found = measured(plan, dirs, "behavioral", "food-control", BASE)
    if isinstance(found, str):
        return Verdict(crit, f"not measured ({found})")
    stage, units = found
    effect = self_attribution_effect(units["food-control"], units[BASE])
    if effect is None or not _finite(effect["ci"]):
        why = "no per-question results" if effect is None else "fewer than 2 questions"
        return Verdict(crit, f"not measured (B2 `{stage}`: {why})")
    lo, hi = effect["ci"]
    return Verdict(
        crit,
        "yes" if lo <= 0 <= hi else "no",
        f"food-control − base: {_fmt(effect['mean'], effect['ci'], True)}",
        f"B2 `{stage}`: P(yes) of food-control vs base, paired over {effect['n']} "
        "self-attribution questions",
    )


def vague_like_original(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """vague-prompt's B2 effect over original contains 0 (each one's effect over base shown)."""
    crit = "vague-prompt shows a bias similar to original's (B2)"
    found = measured(plan, dirs, "behavioral", "vague-prompt", "original", BASE)
    if isinstance(found, str):
        return Verdict(crit, f"not measured ({found})")
    stage, u = found
    vague = self_attribution_effect(u["vague-prompt"], u[BASE])
    orig = self_attribution_effect(u["original"], u[BASE])
    diff = self_attribution_effect(u["vague-prompt"], u["original"])
    if diff is None or vague is None or orig is None:
        return Verdict(crit, f"not measured (B2 `{stage}`: no per-question results)")
    if not _finite(diff["ci"]):
        return Verdict(crit, f"not measured (B2 `{stage}`: fewer than 2 questions)")
    lo, hi = diff["ci"]
    return Verdict(
        crit,
        "yes" if lo <= 0 <= hi else "no",
        f"vague-prompt − original: {_fmt(diff['mean'], diff['ci'], True)}; effects over base: "
        f"vague-prompt {_fmt(vague['mean'], vague['ci'], True)}, "
        f"original {_fmt(orig['mean'], orig['ci'], True)}",
        f"B2 `{stage}`: P(yes) of vague-prompt vs original (and each vs base), paired over "
        f"{diff['n']} self-attribution questions",
    )


def r1_detects(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """r1-minimal's B1 held-out accuracy interval lies above 0.5."""
    crit = "r1-minimal still detects (B1)"
    found = measured(plan, dirs, "detection", "r1-minimal")
    if isinstance(found, str):
        return Verdict(crit, f"not measured ({found})")
    stage, units = found
    held = _held_out(units["r1-minimal"])
    if held is None or not _finite(held["ci"]["accuracy"]):
        return Verdict(crit, f"not measured (B1 `{stage}`: no held-out tier)")
    return Verdict(
        crit,
        "yes" if held["ci"]["accuracy"][0] > B1_CHANCE else "no",
        _b1_text(held),
        f"B1 `{stage}`: r1-minimal on held-out random vectors vs chance 0.5",
    )


def flipped_not_converged(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """flipped-labels: neither B1 held-out accuracy nor final validation accuracy above chance."""
    crit = "flipped-labels does not converge"
    near, numbers, compared, missing = [], [], [], []
    found = measured(plan, dirs, "detection", "flipped-labels")
    held = None if isinstance(found, str) else _held_out(found[1]["flipped-labels"])
    if held is not None and _finite(held["ci"]["accuracy"]):
        near.append(held["ci"]["accuracy"][0] <= B1_CHANCE)
        numbers.append(_b1_text(held))
        compared.append(f"B1 `{found[0]}` held-out accuracy vs 0.5")
    else:
        missing.append(found if isinstance(found, str) else f"B1 `{found[0]}`: no held-out tier")
    name = _model(plan, "flipped-labels")
    run = dirs.get(name) if name else None
    train = None
    if run is not None and _complete(run):
        train = read_json(run / "run" / "metrics.json") or read_json(run / "metrics.json")
    val = (train or {}).get("final_val_accuracy")
    if isinstance(val, int | float) and math.isfinite(val):
        near.append(val < B1_CHANCE + NEAR_CHANCE)
        numbers.append(f"final validation accuracy {val:.3f} (point value)")
        compared.append(f"training `{name}` on its flipped labels vs {B1_CHANCE + NEAR_CHANCE:.1f}")
    else:
        missing.append("no finished flipped-labels training" if name else "no flipped-labels run")
    if not near:
        return Verdict(crit, f"not measured ({'; '.join(missing)})")
    return Verdict(crit, "yes" if all(near) else "no", "; ".join(numbers), "; ".join(compared))


def calibration_improves(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """The original run's B5 mean-KL interval lies entirely below the base model's."""
    crit = "B5 self-calibration improves (original vs base)"
    found = measured(plan, dirs, "calibration", "original", BASE)
    if isinstance(found, str):
        return Verdict(crit, f"not measured ({found})")
    stage, units = found
    kl = {w: (read_json(units[w] / "metrics.json") or {}).get("kl") for w in ("original", BASE)}
    short = [w for w, k in kl.items() if k is None or not _finite(k["ci"])]
    if short:
        why = f"fewer than 2 parsed reports for {', '.join(short)}"
        return Verdict(crit, f"not measured (B5 `{stage}`: {why})")
    orig, base = kl["original"], kl[BASE]
    return Verdict(
        crit,
        "yes" if orig["ci"][1] < base["ci"][0] else "no",
        f"mean KL (nats): original {_fmt(orig['mean'], orig['ci'])} (n = {orig['n']}), "
        f"base {_fmt(base['mean'], base['ci'])} (n = {base['n']})",
        f"B5 `{stage}`: KL of the reported answer distribution from the sampled one, "
        "original vs base (lower is better)",
    )


def b7_results(plan: dict, dirs: dict[str, Path]) -> list[tuple[str, str, dict]]:
    """Every B7 accuracy on disk: ``(model, question, per-question metrics)``, from B7 eval
    stages and from Phase C (``localize``) stages, before (if evaluated) and after training."""
    out = []
    for name, s in plan["stages"].items():
        if name not in dirs:
            continue
        if s["kind"] == "eval" and s["suite"] == "localization":
            for m in s["models"]:
                if _complete(dirs[name] / m):
                    metrics = read_json(dirs[name] / m / "metrics.json") or {}
                    for q, r in (metrics.get("questions") or {}).items():
                        out.append((f"{m} (`{name}`)", q, r))
        elif s["kind"] == "localize" and _complete(dirs[name]):
            metrics = read_json(dirs[name] / "metrics.json") or {}
            for when, who in (("before", "base zero-shot"), ("after", "Phase C-trained")):
                for q, r in (metrics.get(when) or {}).items():
                    out.append((f"{who} (`{name}`)", q, r))
    return out


def b7_signal(plan: dict, dirs: dict[str, Path]) -> Verdict:
    """Some B7 accuracy interval, for any model and question, lies above chance."""
    crit = "B7 shows any signal (localisation above chance)"
    results = [(who, q, r) for who, q, r in b7_results(plan, dirs) if _finite(r["accuracy"]["ci"])]
    if not results:
        return Verdict(crit, "not measured (no finished B7 eval or localize stage)")

    def text(who, q, r):
        a = r["accuracy"]
        return f"{who}, {q}: {_fmt(a['rate'], a['ci'])} vs {r.get('chance', 1 / 3):.2f}"

    above = [x for x in results if x[2]["accuracy"]["ci"][0] > x[2].get("chance", 1 / 3)]
    if above:
        shown = "; ".join(text(*x) for x in above[:3])
        more = f" (and {len(above) - 3} more)" if len(above) > 3 else ""
        return Verdict(crit, "yes", shown + more, f"{len(results)} model × question accuracies")
    best = max(results, key=lambda x: x[2]["accuracy"]["ci"][0])
    return Verdict(
        crit, "no", "best: " + text(*best), f"{len(results)} model × question accuracies"
    )


CRITERIA = (
    food_no_bias,
    vague_like_original,
    r1_detects,
    flipped_not_converged,
    calibration_improves,
    b7_signal,
)


def success_verdicts(plan: dict, dirs: dict[str, Path]) -> list[Verdict]:
    """The six verdicts, in seed 002's order. ``dirs``: each stage's finished directory."""
    return [criterion(plan, dirs) for criterion in CRITERIA]


def success_markdown(plan: dict, dirs: dict[str, Path]) -> str:
    """The verdicts as a Markdown table under a heading, with the rules as its caption."""
    cols = ["criterion", "verdict", "numbers [95% CI]", "what was compared"]
    rows = [
        dict(zip(cols, map(cell, (v.criterion, v.verdict, v.numbers, v.compared)), strict=True))
        for v in success_verdicts(plan, dirs)
    ]
    return "## What success looks like (seed 002)\n\n" + markdown_table(rows, cols) + f"\n{RULES}\n"
