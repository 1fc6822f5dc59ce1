"""The stance comparison's report: ``summary.md`` (tables and verdicts) and its PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from introspect.evals.common import figure, rate_bars
from introspect.io import markdown_table, read_jsonl, write_text
from introspect.plots import heatmap
from introspect.stance.claims import claim_lines
from introspect.stance.judges import judges_line
from introspect.stance.patterns import is_self_category

ALPHA = 0.05  # significance level of the paired (McNemar) verdicts


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _hits(block: dict) -> int:
    """A rate block's successes (runs reused from before the shared rate shape say ``count``)."""
    return block["successes"] if "successes" in block else block["count"]


def _rate(block: dict | None) -> str:
    if not block:
        return "n/a"
    lo, hi = block["ci"]
    return f"{block['rate']:.2f} [{lo:.2f}, {hi:.2f}] ({_hits(block)})"


def _frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _self_pragmatic(rates: dict | None) -> str:
    """Pooled pragmatic_any over the self-property question categories."""
    if not rates:
        return "n/a"
    blocks = [b for c, b in rates["by_category"].items() if is_self_category(c)]
    n = sum(b["n"] for b in blocks)
    if not n:
        return "n/a"
    hits = sum(_hits(b["pragmatic_any"]) for b in blocks)
    return f"{hits / n:.2f} ({hits}/{n})"


def _models(metrics: dict) -> list[tuple[str, dict]]:
    return [("base", metrics["base"]), *metrics["runs"].items()]


# --------------------------------------------------------------------------- plots


def plot_losses(metrics: dict, path: Path) -> None:
    """Per-step training loss: SFT runs (token cross-entropy) and DPO runs (pair loss) apart."""
    from matplotlib.ticker import MaxNLocator

    runs = metrics["runs"]
    kinds = [k for k in ("sft", "dpo") if any(r["kind"] == k for r in runs.values())]
    size = (6 * len(kinds), 4)
    with figure(path, 1, len(kinds), figsize=size, squeeze=False, dpi=110) as (fig, axes):
        for ax, kind in zip(axes[0], kinds, strict=True):
            for name, r in runs.items():
                if r["kind"] == kind:
                    steps = [x["step"] for x in r["log"]]
                    ax.plot(steps, [x["loss"] for x in r["log"]], marker=".", label=name)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("token cross-entropy" if kind == "sft" else "DPO loss")
            if kind == "dpo":
                ax.axhline(np.log(2), ls=":", c="grey", lw=1, label="log 2 (no preference)")
            ax.set_title(f"{kind.upper()} training loss", fontsize=10)
            ax.legend(fontsize=8)


def plot_patterns(metrics: dict, path: Path) -> None:
    """Share of answers with any performative / any pragmatic pattern, per model, 95 % CIs."""

    models = [(n, m) for n, m in _models(metrics) if m["behaviour"]["rates"]]
    with figure(path, figsize=(1.3 * len(models) + 3, 4), dpi=110) as (fig, ax):
        width = 0.38
        groups = (("performative_any", "tab:red"), ("pragmatic_any", "tab:blue"))
        for j, (key, colour) in enumerate(groups):
            xs = np.arange(len(models)) + (j - 0.5) * width
            blocks = [m["behaviour"]["rates"]["overall"][key] for _, m in models]
            style = {"capsize": 3, "color": colour, "alpha": 0.8, "label": key.replace("_", " ")}
            rate_bars(ax, xs, blocks, width, **style)
        ax.set_xticks(range(len(models)), [n for n, _ in models], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of answers")
        n = models[0][1]["behaviour"]["n"] if models else 0
        ax.set_title(
            f"Stance patterns on {n} held-out questions (95% Wilson intervals)", fontsize=10
        )
        ax.legend(fontsize=8)


def plot_layer_changes(metrics: dict, path: Path) -> None:
    """Decoder layer × run heatmap of ‖ΔW_layer‖_F / ‖W_layer‖_F (colour on a log scale)."""
    cols = {n: r["weights"]["layer_relative"] for n, r in metrics["runs"].items()}
    table = pd.DataFrame({n: {int(k): v for k, v in c.items()} for n, c in cols.items()})
    table = table.sort_index()
    labels = table.map(lambda v: "0" if v == 0 else f"{v:.1e}")
    positive = table[table > 0]
    floor = float(positive.min().min()) / 10 if positive.notna().any().any() else 1e-12
    logged = np.log10(table.clip(lower=floor))
    heatmap(
        logged,
        path,
        title="Relative weight change per decoder layer, ‖ΔW‖_F / ‖W‖_F (colour: log10)",
        xlabel="run",
        ylabel="layer",
        labels=labels,
    )


# --------------------------------------------------------------------------- summary


def _verdict(name: str, run: dict) -> str:
    """One sentence on the paired shift of each pattern group."""
    parts = []
    for group in ("performative", "pragmatic"):
        s = run["shift"][group]
        if s["after"] == s["before"]:
            move = f"stayed at {s['after']}"
        else:
            way = "rose" if s["after"] > s["before"] else "fell"
            move = f"{way} from {s['before']} to {s['after']}"
        sig = "significant" if s["p"] < ALPHA else "not significant"
        parts.append(
            f"{group} answers {move} of {s['n']} ({s['gained']} gained, {s['lost']} lost; "
            f"McNemar p = {s['p']:.3g}, {sig} at {ALPHA})"
        )
    return f"* **{name}**: " + "; ".join(parts) + "."


def _criteria_table(metrics: dict) -> str:
    models = [(n, m) for n, m in _models(metrics) if m.get("criteria")]
    if not models:
        return ""
    names = [c["criterion"] for c in models[0][1]["criteria"]]
    mark = {True: "pass", False: "FAIL", None: "–"}
    rows = []
    for i, crit in enumerate(names):
        row = {"criterion": crit}
        for n, m in models:
            c = m["criteria"][i]
            value = "" if c["value"] is None else f" ({c['value']:.2f})"
            row[n] = mark[c["passed"]] + value
        rows.append(row)
    return markdown_table(rows, ["criterion", *[n for n, _ in models]])


def _example(metrics: dict, out: Path) -> str:
    """The first self-property question's answer from every model, shortened."""
    answers = {}
    for name, _ in _models(metrics):
        path = out / name / "responses.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path)
        pick = next((r for r in rows if is_self_category(r["category"])), rows[0] if rows else None)
        if pick is not None:
            answers[name] = pick
    if not answers:
        return ""
    question = next(iter(answers.values()))["question"]
    lines = [f'Answers to the held-out question "{question}" (greedy, truncated):\n']
    for name, r in answers.items():
        text = " ".join(r["response"].split())
        text = text if len(text) <= 240 else text[:237] + "..."
        lines.append(f"* **{name}**: {text or '(empty)'}")
    return "\n".join(lines) + "\n"


def write_report(metrics: dict, config: Any, out: Path) -> None:
    """Write ``summary.md`` and the three comparison PNGs into ``out``."""
    plot_losses(metrics, out / "loss_curves.png")
    plot_patterns(metrics, out / "patterns.png")
    plot_layer_changes(metrics, out / "layer_changes.png")
    runs = metrics["runs"]
    c = metrics["corpus"]

    train_rows = []
    for name, r in runs.items():
        st = r["stability"]
        spikes = ", ".join(map(str, st["spikes"])) or "none"
        max_gn = max((x.get("grad_norm", 0.0) for x in r["log"]), default=0.0)
        share = r["trainable_params"] / r["total_params"]
        cpu = r.get("train_cpu_seconds", 0.0)
        train_rows.append(
            {
                "run": name,
                "kind / method": f"{r['kind']} / {r['method']}",
                "lr": f"{r['lr']:g}",
                "trainable params": f"{r['trainable_params']:,} ({share:.2%})",
                "steps": r["steps"],
                "train time (CPU)": f"{r['train_seconds']:.0f} s ({cpu:.0f} s)",
                "loss first → final": f"{st['first']:.3f} → {st['final']:.3f}",
                "spikes (steps)": spikes,
                "max grad norm": f"{max_gn:.2f}",
                "artifact": _mib(r["artifact_bytes"]),
            }
        )
    beh_rows = []
    for name, m in _models(metrics):
        b = m["behaviour"]
        rates = b["rates"]
        overall = rates["overall"] if rates else {}
        beh_rows.append(
            {
                "model": name,
                "performative any": _rate(overall.get("performative_any")),
                "pragmatic any": _rate(overall.get("pragmatic_any")),
                "self-property pragmatic": _self_pragmatic(rates),
                "ai disclaimer": _rate(overall.get("ai_disclaimer")),
                "factual correct": _frac(b["correct"]["factual"]),
                "syllogism correct": _frac(b["correct"]["syllogism"]),
                "empty answers": b["empty"],
            }
        )
    weight_rows = []
    for name, r in runs.items():
        w = r["weights"]
        top = w["top"][0] if w["top"] else None
        weight_rows.append(
            {
                "run": name,
                "modules changed": w["modules_changed"],
                "median ‖ΔW‖/‖W‖": f"{w['median_relative']:.2e}",
                "median stable rank": f"{w['median_stable_rank']:.1f}",
                "median effective rank": f"{w['median_effective_rank']:.1f}",
                "largest change": f"{top['module']} ({top['relative']:.2e})" if top else "none",
                "RMS(ΔW) CV": _frac(w.get("rms_delta_cv")),
                "corr(log rel., −log RMS(W))": _frac(w.get("corr_relative_inv_rms_w")),
            }
        )

    parts = [
        f"### Epistemic-stance comparison on {metrics['model']}\n",
        f"Each run fine-tunes a fresh copy of {metrics['model']} ({metrics['n_layers']} layers) on "
        f"{c['sft']} SFT examples (DPO: {c['pairs']} preference pairs), chat template applied, "
        "loss on the answer tokens only. Before/after behaviour: greedy answers "
        f"(≤ {config.max_new_tokens} new tokens) to the same {c['eval_questions']} held-out "
        f"questions, each category decided by its judge ({judges_line()}; chosen on the "
        "labelled set's dev half, validated on its held-out half: README); counts in "
        "parentheses. Intervals "
        f"are 95 % Wilson intervals. Wall time of this stage: {metrics['seconds'] / 60:.1f} min "
        f"(CPU time {metrics.get('cpu_seconds', 0) / 60:.1f} min; on a shared machine only CPU "
        "times compare between runs).\n",
        "#### What the seeds claimed, answered\n",
        "\n".join(f"* {x}" for x in claim_lines(metrics, out, _models(metrics))) + "\n",
        "#### Training\n",
        markdown_table(train_rows, list(train_rows[0])),
        "A spike is a step whose loss exceeds 1.5× the median of the five steps before it. Runs "
        "of one kind see the same batches in the same order (same seed), so ups and downs shared "
        "by every curve are batch difficulty, not instability.\n",
        "![training loss](loss_curves.png)\n",
        "#### Behaviour before/after\n",
        markdown_table(beh_rows, list(beh_rows[0])),
        "![stance patterns](patterns.png)\n",
        "Paired verdicts (same questions, McNemar exact test on the questions whose answer "
        "changed group):\n",
        "\n".join(_verdict(n, r) for n, r in runs.items()) + "\n",
        "Seed success criteria (value in parentheses; the factual criterion compares each run "
        "with the base model):\n",
        _criteria_table(metrics),
        _example(metrics, out),
        "#### Where the weights changed\n",
        markdown_table(weight_rows, list(weight_rows[0])),
        "Ranks are of ΔW per module (LoRA: the merged scaling·B·A, so at most r). A caution on "
        "reading these rankings: Adam moves every entry by about the learning rate whatever the "
        "gradient's size, so after a few steps RMS(ΔW) is nearly the same in every trained "
        "module (small CV) and ‖ΔW‖/‖W‖ then mostly ranks matrices by how small their entries "
        "are (correlation near 1). Where that holds, the largest relative change says where the "
        "weights are small, not where the stance is stored.\n",
        "![relative change per layer](layer_changes.png)\n",
        *[f"![{n} weight changes]({n}/weight_changes.png)\n" for n in runs],
    ]
    parts.append(_checkpoint_section(runs))
    parts.append(_composition_section(metrics.get("composition")))
    text = "\n".join(p for p in parts if p)
    write_text(out / "summary.md", text)


def _checkpoint_section(runs: dict) -> str:
    blocks = [(n, r["layer_checkpoints"]) for n, r in runs.items() if "layer_checkpoints" in r]
    if not blocks:
        return ""
    out = ["#### Selective layer checkpoints of the full fine-tune\n"]
    for name, lc in blocks:
        rows = [
            {
                "top-k modules": "base (k = 0)" if r["k"] == 0 else r["modules"],
                "size": _mib(r["bytes"]) if r["bytes"] else "0",
                "holds lm_head": "yes" if r.get("has_lm_head") else "no",
                f"mean next-token KL({name} ‖ checkpoint)": f"{r['kl_to_tuned']:.3g}",
            }
            for r in lc["rows"]
        ]
        out.append(
            f"Top-k modules of {name} by ‖ΔW‖/‖W‖, their ΔW added onto the base; KL over every "
            f"position of {lc['prompts']} held-out prompts. Norm weights are not linear modules "
            "and are not in any checkpoint. lm_head shares its weight with the token embedding, "
            "so a checkpoint holding it is large and also changes the embedding.\n"
        )
        out.append(markdown_table(rows, list(rows[0])))
    return "\n".join(out)


def _composition_section(c: dict | None) -> str:
    if not c:
        return ""
    w = c["weights"]
    fid = "n/a" if c["fidelity"] is None else f"{c['fidelity']:.3f}"
    return (
        f"#### Composing selective checkpoints ({w[0]:g} / {w[1]:g})\n\n"
        f"base + {w[0]:g}·(full's top-{c['full_modules']} checkpoint) + {w[1]:g}·(selective's "
        f"checkpoint), against the exact mix base + {w[0]:g}·ΔW_full + {w[1]:g}·ΔW_selective: "
        f"KL(exact ‖ composed) = {c['kl_exact_composed']:.3g} against KL(exact ‖ base) = "
        f"{c['kl_exact_base']:.3g} over {c['prompts']} held-out prompts, fidelity "
        f"1 − ratio = **{fid}**.\n"
    )
