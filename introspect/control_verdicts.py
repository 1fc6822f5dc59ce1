"""What the controls say: one verdict row per control and model, from a plan's results on disk.

The critics' confounds (issue: controls that survive the critics), each answered by a suite's
``metrics.json`` or by B1 stages that differ only in the answer pair:

* **answer pair** - B1 held-out accuracy of every model under every answer pair the plan asks
  (the transfer matrix: trained pair × evaluated pair);
* **yes-bias** and **logit-shift probe** - the yes-bias suite's verdict, and its probe's AUROC
  beside the model's own B1 held-out AUROC on the same pair;
* **input tampering** - the input-control suite's verdict;
* **side effects** - capability exact match and B2 self-attribution P(yes), each as a paired
  change from the base model when the plan evaluates it (per question; rows the mass filter
  excluded in either model left out).

Like :mod:`introspect.verdicts`, whatever a plan did not produce is simply absent.
"""

from __future__ import annotations

from pathlib import Path

from introspect.io import cell, markdown_table, read_json
from introspect.verdicts import BASE, _finite, _fmt

CONTROL_SUITES = ("yes-bias", "input-control", "side-effects")


def _units(plan: dict, dirs: dict[str, Path], suite: str):
    """``(stage, model, metrics, unit dir)`` of every finished unit of a ``suite`` stage."""
    for name, s in plan["stages"].items():
        if s["kind"] != "eval" or s["suite"] != suite or name not in dirs:
            continue
        for m in s["models"]:
            unit = dirs[name] / m
            metrics = read_json(unit / "metrics.json") if (unit / "COMPLETE").exists() else None
            if metrics:
                yield name, m, metrics, unit


def trained_pair(plan: dict, model: str) -> str | None:
    """The answer pair a train stage's data asked for (None for the base model)."""
    stage = plan["stages"].get(model, {})
    data = plan["stages"].get(stage.get("data", ""), {})
    return data.get("answers", "yes-no") if stage.get("kind") == "train" else None


def _row(control: str, model: str, verdict: str, numbers: str, what: str) -> dict:
    return {"control": control, "model": model, "verdict": verdict, "numbers": numbers,
            "what": what}  # fmt: skip


def _acc(held: dict) -> str:
    return _fmt(held["accuracy"], held["ci"]["accuracy"])


def answer_pair_rows(plan: dict, dirs: dict[str, Path]) -> tuple[list[dict], dict]:
    """Verdict rows for the answer-pair matrix, and the matrix itself
    ``{model: {evaluated pair: held-out tier metrics}}``."""
    matrix: dict[str, dict[str, dict]] = {}
    for _, model, m, _ in _units(plan, dirs, "detection"):
        held = (m.get("tiers") or {}).get("held_out")
        if held:
            matrix.setdefault(model, {}).setdefault(m.get("answers", "yes-no"), held)
    rows = []
    pairs = sorted({p for v in matrix.values() for p in v})
    if len(pairs) < 2:
        return rows, matrix
    for model, by_pair in matrix.items():
        own = trained_pair(plan, model)
        for pair, held in by_pair.items():
            above = held["ci"]["accuracy"][0] > 0.5
            if own is None:
                what = f"base model, asked {pair}"
                word = "detects" if above else "does not detect"
            elif pair == own:
                what = f"trained and asked {pair}"
                word = "detection holds" if above else "no detection"
            else:
                what = f"trained {own}, asked {pair} (transfer)"
                word = "transfers" if above else "does not transfer"
            numbers = f"B1 held-out accuracy {_acc(held)}"
            rows.append(_row("answer pair", model, word, numbers, what))
    return rows, matrix


def probe_rows(plan: dict, dirs: dict[str, Path], matrix: dict) -> list[dict]:
    """The yes-bias verdict and the logit-shift probe beside B1's AUROC, per model."""
    rows = []
    for _, model, m, _ in _units(plan, dirs, "yes-bias"):
        word, _, numbers = m["verdict"].partition(": ")
        what = f"{m['n_rows']} rows, {m['excluded']} excluded by the mass filter"
        rows.append(_row("yes-bias", model, word, numbers, what))
        probe = m.get("logit_probe")
        if not probe or not _finite(probe["ci"]):
            continue
        pair = trained_pair(plan, model) or "yes-no"
        held = matrix.get(model, {}).get(pair)
        text = f"probe AUROC {_fmt(probe['auroc'], probe['ci'])}"
        word = "not compared (no B1 on this pair)"
        if held:
            auc = held["auroc"]
            text += f"; B1 AUROC {_fmt(auc, held['ci']['auroc'])}"
            if held["ci"]["auroc"][0] > probe["ci"][1]:
                word = "detection exceeds the logit shift"
            elif held["ci"]["auroc"][1] < probe["ci"][0]:
                word = "the logit shift reads steering better than the model's answer"
            else:
                word = "detection no better than the logit shift"
        what = f"unrelated questions over steered caches vs B1 ({pair})"
        rows.append(_row("logit-shift probe", model, word, text, what))
    return rows


def input_rows(plan: dict, dirs: dict[str, Path]) -> list[dict]:
    rows = []
    for _, model, m, _ in _units(plan, dirs, "input-control"):
        head, _, rates = m["verdict"].partition("; says steered: ")
        what = (f"{m['n_trials']} conversations × {len(m['conditions'])} conditions, "
                f"{m['excluded']} rows excluded")  # fmt: skip
        rows.append(_row("input tampering", model, head, f"says steered: {rates}", what))
    return rows


def side_effect_rows(plan: dict, dirs: dict[str, Path]) -> list[dict]:
    """Capability and self-attribution per model, as paired changes from the base model."""
    import pandas as pd

    from introspect.evals.common import mean_ci
    from introspect.evals.side_effects import exact_match

    units = {model: (m, unit) for _, model, m, unit in _units(plan, dirs, "side-effects")}
    base = units.get(BASE)

    def correct(unit: Path) -> pd.Series:
        cap = pd.read_json(unit / "capability.jsonl", lines=True).set_index("key")
        return pd.Series([exact_match(r, a) for r, a in zip(cap["response"], cap["answers"],
                                                            strict=True)], cap.index)  # fmt: skip

    def self_p(unit: Path, min_mass: float) -> pd.Series:
        b = pd.read_parquet(unit / "behavioral.parquet").set_index("key")
        b = b[b["category"].str.startswith("self") & (b["yes_no_mass"] >= min_mass)]
        return b["p_yes"]

    rows = []
    for model, (m, unit) in units.items():
        cap = m["capability"]["all"]
        numbers = f"exact match {_fmt(cap['rate'], cap['ci'])}"
        sa = m["self_attribution_all"]
        numbers += (
            f"; self-attribution P(yes) {_fmt(sa['p_yes']['mean'], sa['p_yes']['ci'])}"
            if _finite(sa["p_yes"]["ci"])
            else f"; self-attribution P(yes) n = {sa['p_yes']['n']}"
        )
        word, what = "ledger", f"{cap['n']} questions; {sa['excluded']} self rows excluded"
        if base is not None and model != BASE:
            d = mean_ci((correct(unit).astype(float) - correct(base[1]).astype(float)).dropna())
            sp = self_p(unit, m["min_mass"]).sub(self_p(base[1], m["min_mass"])).dropna()
            ds = mean_ci(sp)
            numbers += f"; Δ exact match vs base {_fmt(d['mean'], d['ci'], signed=True)}"
            if ds["n"] >= 2:
                numbers += (
                    f"; Δ self P(yes) vs base {_fmt(ds['mean'], ds['ci'], signed=True)} "
                    f"(n = {ds['n']} kept in both)"
                )
            lost = _finite(d["ci"]) and d["ci"][1] < 0
            word = "capability lost" if lost else "no capability loss shown"
            what = "paired by question with the base model"
        rows.append(_row("side effects", model, word, numbers, what))
    return rows


def controls_markdown(plan: dict, dirs: dict[str, Path]) -> str | None:
    """The section, or None when the plan runs no control."""
    pair_rows, matrix = answer_pair_rows(plan, dirs)
    rows = pair_rows + probe_rows(plan, dirs, matrix) + input_rows(plan, dirs)
    rows += side_effect_rows(plan, dirs)
    if not rows:
        return None
    cols = ["control", "model", "verdict", "numbers", "what"]
    table = markdown_table([{k: cell(r[k]) for k in cols} for r in rows], cols)
    out = "## What the controls say\n\n" + table
    pairs = sorted({p for v in matrix.values() for p in v})
    if len(pairs) >= 2:
        head = ["model (trained pair)", *[f"asked {p}" for p in pairs]]
        grid = [dict(zip(head, [f"{m} ({trained_pair(plan, m) or 'untrained'})",
                                *[_acc(v[p]) if p in v else "–" for p in pairs]], strict=True))
                for m, v in matrix.items()]  # fmt: skip
        out += ("\nB1 held-out accuracy [95% CI] by the answer pair a model was trained on and "
                "the one it is asked for:\n\n" + markdown_table(grid, head))  # fmt: skip
    return out + "\n"
