"""The plan report, rebuilt from the results on disk alone (``report.md`` and ``report.html``).

Reads ``runs/<plan>/plan.json`` (written by the plan runner) and each finished stage's
``metrics.json``, ``timing.json`` and ``summary.md``, and the runner's ``status.json`` (which
units failed, with their one-line errors, and which were blocked by a failed input). Numbers in
the comparison table are read from the per-run metrics files, never recomputed, so the report
always equals them; seed 002's success criteria are judged in :mod:`introspect.verdicts`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from introspect.control_verdicts import controls_markdown
from introspect.errors import IntrospectError
from introspect.io import markdown_table, read_json, write_text
from introspect.replicates import seeds_markdown
from introspect.verdicts import success_markdown


def _stage_dirs(root: Path, plan: dict) -> dict[str, Path]:
    """Each stage's finished directory (the newest complete one if several hashes exist)."""
    out = {}
    for name in plan["stages"]:
        done = [p for p in (root / name).glob("*") if p.is_dir() and not p.name.startswith(".")]
        done = [p for p in done if (p / "COMPLETE").exists() or any(p.glob("*/COMPLETE"))]
        if done:
            out[name] = max(done, key=lambda p: p.stat().st_mtime)
    # The runner's record of this plan's current hashes.
    current = read_json(root / "stages.json") or {}
    out.update({k: root / k / h for k, h in current.items() if (root / k / h).exists()})
    return out


def _outputs(stage: dict, stage_dir: Path) -> list[Path]:
    """Where a stage's results lie: one directory per model for an eval, else its own."""
    return [stage_dir / m for m in stage["models"]] if stage["kind"] == "eval" else [stage_dir]


def _ci(m: dict, key: str, digits: int = 3) -> str:
    lo, hi = m["ci"][key]
    return f"{m[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def detection_table(evals: dict[str, dict]) -> pd.DataFrame:
    """One row per (model, tier): B1 metrics with intervals, straight from metrics.json."""
    rows = []
    for model, metrics in evals.items():
        tiers = list(metrics["tiers"].items())
        if "food" in metrics:
            tiers.append(("food", metrics["food"]))
        for tier, m in tiers:
            rows.append(
                {
                    "model": model,
                    "tier": tier,
                    "accuracy [95% CI]": _ci(m, "accuracy"),
                    "TPR": f"{m['tpr']:.3f}",
                    "FPR": f"{m['fpr']:.3f}",
                    "d′": f"{m['d_prime']:.2f}",
                    "AUROC [95% CI]": _ci(m, "auroc"),
                    "n s/u": f"{m['n_steered']}/{m['n_unsteered']}",
                    "excluded (low mass)": f"{m.get('excluded', 0)}/{m.get('n_rows', '–')}",
                    # With min_mass 0 nothing is excluded: how much the answers still weigh.
                    "mean answer mass": f"{m.get('mean_yes_no_mass', float('nan')):.2f}",
                }
            )
    return pd.DataFrame(rows)


def verdict(model: str, preset: str | None, metrics: dict, train: dict | None) -> str:
    """What the numbers say about one model, in words (the controls' verdicts included)."""
    held = metrics["tiers"].get("held_out") or next(iter(metrics["tiers"].values()))
    lo, hi = held["ci"]["accuracy"]
    acc = f"held-out accuracy {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    detects = lo > 0.5
    way = "detects" if detects else ("anti-detects" if hi < 0.5 else "does not detect")
    if preset == "food-control":
        food = metrics.get("food")
        if food is None:
            learned = "the food task was not evaluated"
        elif food["ci"]["accuracy"][0] > 0.5:
            learned = f"it learned the food question (food accuracy {_ci(food, 'accuracy')})"
        else:
            learned = "it did not learn the food question either"
        shows = "shows detection of steering" if detects else "shows no detection of steering"
        return f"**{model}** (food-control): {shows} ({acc}); {learned}."
    if preset == "flipped-labels":
        val = train.get("final_val_accuracy") if train else None
        learned = "no training metrics"
        if val is not None:
            learned = f"validation accuracy on its flipped labels is {val:.3f}"
            if abs(val - 0.5) < 0.1:
                learned += " — near chance: random labels carry nothing to learn"
        return f"**{model}** (flipped-labels): {learned}; on B1 it {way} steering ({acc})."
    if model == "base":
        word = "already detects" if detects else "does not detect"
        return f"**base** (untrained): {word} steering ({acc})."
    return f"**{model}** ({preset or 'trained'}): {way} steering on held-out vectors ({acc})."


def _rebase(summary: str, stage_dir: Path, report_dir: Path) -> str:
    """Point a stage summary's relative image links at the stage directory."""
    rel = os.path.relpath(stage_dir, report_dir)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith("/"):
            return m.group(0)
        return f"![{m.group(1)}]({rel}/{target})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", fix, summary)


def build_report(root: str | os.PathLike) -> Path:
    """Write ``report.md`` and ``report.html`` into ``root`` (a plan's run directory)."""
    root = Path(root)
    plan = read_json(root / "plan.json")
    if plan is None:
        raise IntrospectError(f"report: {root} has no plan.json (is it a plan's run directory?)")
    dirs = _stage_dirs(root, plan)
    stages = plan["stages"]
    presets = {n: s.get("preset") for n, s in stages.items() if s["kind"] == "train"}
    parts = [f"# {plan['name']}: report", ""]
    if plan.get("description"):
        parts += [plan["description"].strip(), ""]
    parts += [f"Model: `{plan['model']}`.", ""]
    states = unit_states(root, plan, dirs)
    parts += failed_section(states)
    parts += [success_markdown(plan, dirs)]
    controls = controls_markdown(plan, dirs)
    if controls:
        parts += [controls]

    # The B1 comparison across models, and the verdicts.
    for name, s in stages.items():
        if s["kind"] != "eval" or s["suite"] != "detection" or name not in dirs:
            continue
        evals = {
            m: read_json(dirs[name] / m / "metrics.json")
            for m in s["models"]
            if (dirs[name] / m / "COMPLETE").exists()
        }
        evals = {m: v for m, v in evals.items() if v}
        if not evals:
            continue
        parts += [f"## B1 detection across models (`{name}`)", ""]
        parts += [markdown_table(detection_table(evals)), ""]
        parts += ["**Verdicts.**", ""]
        for m, metrics in evals.items():
            train = read_json(dirs[m] / "run" / "metrics.json") if m in dirs else None
            parts.append(f"- {verdict(m, presets.get(m), metrics, train)}")
        parts += [""]
    seeds = seeds_markdown(plan, dirs)
    if seeds:
        parts += [seeds]

    # Every stage's own summary, grouped by kind.
    titles = {
        "train": "Training runs",
        "sweep": "Sweeps",
        "eval": "Evaluations",
        "stance": "Epistemic stance",
        "localize": "Localisation training (Phase C)",
        "data": "Data",
        "vectors": "Vectors",
        "norms": "Residual norms",
    }
    for kind, title in titles.items():
        names = [n for n, s in stages.items() if s["kind"] == kind and n in dirs]
        if not names:
            continue
        parts += [f"## {title}", ""]
        for n in names:
            for d in _outputs(stages[n], dirs[n]):
                if (d / "summary.md").exists():
                    parts += [_rebase((d / "summary.md").read_text(), d, root), ""]

    parts += ["## Time and cost per stage", "", markdown_table(cost_table(states)), ""]
    text = "\n".join(parts)
    write_text(root / "report.md", text)
    write_text(root / "report.html", to_html(text, f"{plan['name']} report"))
    return root / "report.md"


# The runner's words for units that did not finish (pipelines.runner.UnitStatus).
_UNFINISHED = ("failed", "blocked")
UnitState = tuple[str, str, dict | None]  # key, state, timing (None unless done)


def unit_states(root: Path, plan: dict, dirs: dict[str, Path]) -> list[UnitState]:
    """Each unit's key (``stage``, or ``stage[model]`` for an eval model), state and timing.

    "done" when its result is on disk; else the runner's record in ``status.json`` of a failed
    (``failed: <error>``) or blocked unit; else "not finished" (its stage began) or "not run".
    A result at an older hash than the plan's current one (``stages.json``) does not hide a
    failure of the current one; a current result outranks an older status record."""
    status = read_json(root / "status.json") or {}
    current = read_json(root / "stages.json") or {}
    out = []
    for name, s in plan["stages"].items():
        d = dirs.get(name)
        fresh = d is not None and current.get(name, d.name) == d.name
        if s["kind"] == "eval":
            units = [(f"{name}[{m}]", d / m if d else None) for m in s["models"]]
        else:
            units = [(name, d)]
        for key, path in units:
            timing = read_json(path / "timing.json") if path else None
            if timing is not None:
                timing = timing | {"dtype": ran_dtype(path)}
            record = status.get(key, "")
            if timing is not None and (fresh or not record.startswith(_UNFINISHED)):
                out.append((key, "done", timing))
            elif record.startswith(_UNFINISHED):
                out.append((key, record, None))
            else:
                out.append((key, "not finished" if d is not None else "not run", None))
    return out


def ran_dtype(unit: Path) -> str | None:
    """The dtype a unit's model ran in, from the config its recipe recorded (a training's sits
    in ``run/``, a vector file's beside it as ``NAME.config.json``)."""
    for path in (unit / "config.json", unit / "run" / "config.json", *unit.glob("*.config.json")):
        if path.is_file():
            return (read_json(path) or {}).get("dtype")
    return None


def failed_section(states: list[UnitState]) -> list[str]:
    """Report lines naming each failed unit and its error, and the units it blocked."""
    failed = [
        (k, s.removeprefix("failed:").strip()) for k, s, _ in states if s.startswith("failed")
    ]
    if not failed:
        return []
    lines = ["## Failed stages", ""] + [f"- `{k}`: {err}" for k, err in failed]
    blocked = [f"`{k}`" for k, s, _ in states if s.startswith("blocked")]
    if blocked:
        lines += ["", f"Blocked (an input failed): {', '.join(blocked)}."]
    return lines + [""]


def cost_table(states: list[UnitState]) -> pd.DataFrame:
    """One row per unit (from :func:`unit_states`): its state, time and cost, and a total."""
    rows = []
    for key, state, t in states:
        if t is None:
            rows.append({"stage": key, "state": state})
            continue
        rows.append(
            {
                "stage": key,
                "state": state,
                "wall s": round(t["wall_s"], 1),
                # Tries lost with a worker or node and run again: by the runner, by Ray Train,
                # and an evaluation's shards run again on another model host.
                "retries": sum(t.get(k, 0) for k in ("retries", "restarts", "shard_retries")),
                "device": t["device"],
                "dtype": t.get("dtype") or "",
                "device-hours": round(t["device_hours"], 4),
                "USD": round(t["usd"], 4),
            }
        )
    table = pd.DataFrame(rows)
    if "wall s" in table:
        total = {
            "stage": "total",
            "state": "",
            "wall s": round(table["wall s"].sum(), 1),
            "retries": int(table["retries"].sum()),
            "device": "",
            "dtype": "",
            "device-hours": round(table["device-hours"].sum(), 4),
            "USD": round(table["USD"].sum(), 4),
        }
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    return table


def _slug(text: str, seen: set[str]) -> str:
    """A heading's anchor: lower-case words joined by '-', numbered when repeated."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 1
    while slug in seen:
        n += 1
        slug = f"{base}-{n}"
    seen.add(slug)
    return slug


def to_html(markdown: str, title: str) -> str:
    """Standalone HTML for the Markdown report (tables and images included), every heading
    with an anchor and the sections listed at the top: the report is long."""
    from html import escape

    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(markdown)
    seen: set[str] = set()
    contents = []
    for tok, inline in zip(tokens, tokens[1:], strict=False):
        if tok.type != "heading_open":
            continue
        text = "".join(c.content for c in inline.children or [] if c.type != "softbreak")
        tok.attrSet("id", _slug(text, seen))
        if tok.tag == "h2":
            contents.append(f"<li><a href='#{tok.attrGet('id')}'>{escape(text)}</a></li>")
    body = md.renderer.render(tokens, md.options, {})
    nav = f"<nav><ul>{''.join(contents)}</ul></nav>" if contents else ""
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}"
        "img{max-width:49%;vertical-align:top}nav ul{columns:2;font-size:14px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{style}</style></head><body>{nav}{body}</body></html>\n"
    )
