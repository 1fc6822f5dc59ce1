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


def _row(control: str, model: str, verdict: str, numbers: str, what: str) -> dict:
    return {"control": control, "model": model, "verdict": verdict, "numbers": numbers,
            "what": what}  # fmt: skip


def trained_pair(plan: dict, model: str) -> str | None:
    """The answer pair a train stage's data asked for (None for the base model)."""
    stage = plan["stages"].get(model, {})
    data = plan["stages"].get(stage.get("data", ""), {})
    return data.get("answers", "yes-no") if stage.get("kind") == "train" else None


def trained_family(plan: dict, model: str) -> str | None:
    """The vectors stage a train stage's data steered with (None for the base model)."""
    stage = plan["stages"].get(model, {})
    data = plan["stages"].get(stage.get("data", ""), {})
    return data.get("vectors") if stage.get("kind") == "train" else None


def b1_held_out(plan: dict, dirs: dict[str, Path]) -> dict[tuple[str, str, str], dict]:
    """B1's held-out tier per ``(model, evaluated answer pair, evaluated vectors stage)``."""
    out: dict[tuple[str, str, str], dict] = {}
    for stage, model, m, _ in _units(plan, dirs, "detection"):
        held = (m.get("tiers") or {}).get("held_out")
        vectors = (plan["stages"][stage].get("vectors") or ["?"])[0]
        if held:
            out.setdefault((model, m.get("answers", "yes-no"), vectors), held)
    return out


def _acc(held: dict) -> str:
    if not held["n_steered"] + held["n_unsteered"]:
        return f"all {held.get('excluded', '')} rows excluded (mass < filter)"
    return _fmt(held["accuracy"], held["ci"]["accuracy"])


def _judged(held: dict, above: str, below: str) -> str:
    if not held["n_steered"] + held["n_unsteered"]:
        return "not measurable: no row passes the mass filter"
    return above if held["ci"]["accuracy"][0] > 0.5 else below


def _matrix(b1: dict, models: list[str], columns: list[tuple[str, str]]) -> dict:
    """``{model: {column: held}}`` over the given (pair, vectors) columns."""
    return {m: {c: b1[(m, *c)] for c in columns if (m, *c) in b1} for m in models}


def answer_pair_rows(plan: dict, b1: dict) -> tuple[list[dict], dict]:
    """Verdict rows for the answer-pair matrix (models asked in two or more pairs, on one
    vector family), and the matrix ``{model: {evaluated pair: held-out tier metrics}}``;
    ``b1`` is :func:`b1_held_out`'s."""
    families = {v for _, _, v in b1}
    for family in sorted(families):
        pairs = sorted({p for _, p, v in b1 if v == family})
        if len(pairs) >= 2:
            break
    else:
        return [], {}
    asked = {m for m, _, v in b1 if v == family}
    models = [m for m in dict.fromkeys(m for m, _, _ in b1) if m in asked]
    models = [m for m in models if sum((m, p, family) in b1 for p in pairs) >= 2]
    grid = _matrix(b1, models, [(p, family) for p in pairs])
    matrix = {m: {p: v[(p, family)] for p in pairs if (p, family) in v} for m, v in grid.items()}
    rows = []
    for model, by_pair in matrix.items():
        own = trained_pair(plan, model)
        for pair, held in by_pair.items():
            if own is None:
                what = f"base model, asked {pair}"
                word = _judged(held, "detects", "does not detect")
            elif pair == own:
                what = f"trained and asked {pair}"
                word = _judged(held, "detection holds", "no detection")
            else:
                what = f"trained {own}, asked {pair} (transfer)"
                word = _judged(held, "transfers", "does not transfer")
            numbers = f"B1 held-out accuracy {_acc(held)}; mean answer mass "
            numbers += f"{held.get('mean_yes_no_mass', float('nan')):.2f}"
            rows.append(_row("answer pair", model, word, numbers, what))
    return rows, matrix


def family_rows(plan: dict, b1: dict) -> tuple[list[dict], dict]:
    """The vector-family transfer matrix (yes/no answers): ``{model: {evaluated vectors
    stage: held}}`` for models trained on a family and evaluated on two or more, and a
    verdict row per cell; ``b1`` is :func:`b1_held_out`'s."""
    families = list(dict.fromkeys(v for _, p, v in b1 if p == "yes-no"))
    if len(families) < 2:
        return [], {}
    models = [m for m in dict.fromkeys(m for m, _, _ in b1)
              if sum((m, "yes-no", f) in b1 for f in families) >= 2]  # fmt: skip
    grid = _matrix(b1, models, [("yes-no", f) for f in families])
    matrix = {m: {f: v[("yes-no", f)] for f in families if ("yes-no", f) in v}
              for m, v in grid.items()}  # fmt: skip
    rows = []
    for model, by_family in matrix.items():
        own = trained_family(plan, model)
        for family, held in by_family.items():
            if own is None or family == own:
                word = _judged(held, "detects", "does not detect")
                what = (f"base model, steered with {family}" if own is None
                        else f"trained and evaluated on {family}")  # fmt: skip
            else:
                word = _judged(held, "transfers", "does not transfer")
                what = f"trained on {own}, evaluated on {family}"
            rows.append(_row("vector family", model, word,
                             f"B1 held-out accuracy {_acc(held)}", what))  # fmt: skip
    return rows, matrix


def probe_rows(plan: dict, dirs: dict[str, Path], b1: dict) -> list[dict]:
    """The yes-bias verdict and the logit-shift probe beside B1's AUROC (``b1``:
    :func:`b1_held_out`'s), per model."""
    rows = []
    from introspect.evals.yes_bias import verdict

    for _, model, m, _ in _units(plan, dirs, "yes-bias"):
        word, _, numbers = verdict(m).partition(": ")  # today's rule over the stored metrics
        what = f"{m['n_rows']} rows, {m['excluded']} excluded by the mass filter"
        rows.append(_row("yes-bias", model, word, numbers, what))
        probe = m.get("logit_probe")
        if not probe or not _finite(probe["ci"]):
            why = "too few rows of both kinds pass the mass filter to fit it"
            rows.append(_row("logit-shift probe", model, "not measurable", why, what))
            continue
        pair = trained_pair(plan, model) or "yes-no"
        # B1 on the model's own pair and vector family, else on its pair and any family.
        held = b1.get((model, pair, trained_family(plan, model))) or next(
            (v for (who, asked, _), v in b1.items() if who == model and asked == pair), None
        )
        text = f"probe AUROC {_fmt(probe['auroc'], probe['ci'])}"
        word = "not compared (no B1 on this pair)"
        if held and not held["n_steered"] + held["n_unsteered"]:
            word = "not compared: every B1 row is under the mass filter"
        elif held:
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

    units = {model: (m, unit) for _, model, m, unit in _units(plan, dirs, "side-effects")}
    base = units.get(BASE)

    def correct(unit: Path) -> pd.Series:  # each row's exact match, as the stage judged it
        cap = pd.read_json(unit / "capability.jsonl", lines=True)
        return cap.set_index("key")["correct"].astype(bool)

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


def susceptibility_rows(plan: dict, dirs: dict[str, Path]) -> list[dict]:
    """Next-token KL and the concept judge per model; against the base model, the KL paired
    trial by trial (the same trials: same concepts, texts and strengths)."""
    import pandas as pd

    from introspect.evals.common import fmt_rate, mean_ci

    units = {model: (m, unit) for _, model, m, unit in _units(plan, dirs, "susceptibility")}
    base = units.get(BASE)

    def kl(unit: Path) -> pd.Series:
        r = pd.read_parquet(unit / "results.parquet", columns=["key", "steered", "kl"])
        return r[r["steered"]].set_index("key")["kl"]

    rows = []
    for model, (m, unit) in units.items():
        o = m["overall"]
        numbers = (f"KL {_fmt(m['kl']['mean'], m['kl']['ci'])} nats; text names the concept "
                   f"{fmt_rate(o['keyword_steered'])} steered vs "
                   f"{fmt_rate(o['keyword_control'])} unsteered")  # fmt: skip
        word, what = "reference", f"{o['n']} concept injections"
        if base is not None and model != BASE:
            d = mean_ci(kl(unit).sub(kl(base[1])).dropna())
            numbers += f"; Δ KL vs base {_fmt(d['mean'], d['ci'], signed=True)}"
            word = "no change shown"
            if _finite(d["ci"]) and d["ci"][0] > 0:
                word = "more susceptible than base"
            elif _finite(d["ci"]) and d["ci"][1] < 0:
                word = "less susceptible than base"
            what = "KL paired trial by trial with the base model"
        rows.append(_row("susceptibility", model, word, numbers, what))
    return rows


def _grid(matrix: dict, columns: list[str], label, caption: str) -> str:
    head = ["model", *columns]
    rows = [dict(zip(head, [label(m), *[_acc(v[c]) if c in v else "–" for c in columns]],
                     strict=True)) for m, v in matrix.items()]  # fmt: skip
    return f"\n{caption}\n\n" + markdown_table(rows, head)


def controls_markdown(plan: dict, dirs: dict[str, Path]) -> str | None:
    """The section, or None when the plan runs no control."""
    b1 = b1_held_out(plan, dirs)  # read once: three sections use it
    pair_rows, pairs = answer_pair_rows(plan, b1)
    fam_rows, families = family_rows(plan, b1)
    rows = pair_rows + fam_rows + probe_rows(plan, dirs, b1) + input_rows(plan, dirs)
    rows += side_effect_rows(plan, dirs) + susceptibility_rows(plan, dirs)
    if not rows:
        return None
    cols = ["control", "model", "verdict", "numbers", "what"]
    out = "## What the controls say\n\n" + markdown_table(
        [{k: cell(r[k]) for k in cols} for r in rows], cols
    )
    if pairs:
        columns = sorted({p for v in pairs.values() for p in v})
        out += _grid(pairs, [*columns], lambda m: f"{m} ({trained_pair(plan, m) or 'untrained'})",
                     "B1 held-out accuracy [95% CI] by the answer pair a model was trained on "
                     "(rows) and the one it is asked for (columns):")  # fmt: skip
    if families:
        columns = list(dict.fromkeys(f for v in families.values() for f in v))
        out += _grid(families, columns,
                     lambda m: f"{m} ({trained_family(plan, m) or 'untrained'})",
                     "B1 held-out accuracy [95% CI] by the vector family a model was "
                     "trained on (rows) and the family whose held-out vectors steer "
                     "(columns):")  # fmt: skip
    return out + "\n"
