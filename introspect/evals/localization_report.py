"""B7's summary table and figure: accuracy against chance per question, and the confusion
matrices (:mod:`introspect.evals.localization` computes the metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from introspect.evals.common import figure, fmt_rate, rate_bars
from introspect.io import markdown_table


def summary_markdown(metrics: dict, title: str, note: str = "", level: int = 3) -> str:
    """The per-question table (with chance, prior and the mass filter's exclusions) under a
    heading of ``level``; the concept question adds its mutual information."""
    rows = []
    for q, m in metrics.items():
        lo = m["accuracy"]["ci"][0]
        given = sorted(zip(m["answer_rates"], m["answers"], strict=True), reverse=True)
        rows.append(
            {
                "question": q,
                "n": m["accuracy"]["n"],
                "accuracy [95% CI]": fmt_rate(m["accuracy"]),
                "chance": f"{m['chance']:.2f}",
                "prior": f"{m['prior_accuracy']['rate']:.2f}",
                "above chance": "yes" if lo > m["chance"] else "no",
                # the three most given answers: a model stuck on one shows it
                "answers given": ", ".join(f"{a} {r:.0%}" for r, a in given[:3]),
                "answer mass": f"{m['mean_answer_mass']:.2f}",
                f"excluded (mass < {m.get('min_mass', 0):g})": m.get("excluded", 0),
            }
        )
    return (
        f"{'#' * level} {title}\n\n{note}"
        "Accuracy = argmax of the K answer-token logits equals the truth; labels are balanced, "
        "so chance is 1/K, and the answer-prior baseline (always the most common label) scores "
        "the same. 'Above chance' = the Wilson 95 % interval lies above 1/K. 'Answers given' "
        "shows the three most given answers (a model that always picks one option).\n\n"
        + markdown_table(rows, list(rows[0]))
        + _information(metrics.get("concept"))
    )


def _information(m: dict | None) -> str:
    if not m or "mutual_information_bits" not in m:
        return ""
    return (
        f"\nConcept question: {m['mutual_information_bits']:.2f} bits of mutual information "
        f"between the injected and the reported concept over {m['n_concepts']} held-out "
        f"concepts (plug-in {m['mutual_information_plug_in_bits']:.2f} less "
        f"{m['mutual_information_shuffled_bits']:.2f} for shuffled reports).\n"
    )


def plot(metrics: dict, path: Path, title: str) -> None:
    """Accuracy per question with intervals and chance, and the confusion matrices."""
    qs = list(metrics)
    with figure(path, 1, len(qs) + 1, figsize=(3.8 * (len(qs) + 1), 3.8)) as (fig, axes):
        ax = axes[0]
        rate_bars(ax, qs, [metrics[q]["accuracy"] for q in qs], capsize=4, color="C0")
        ax.scatter(range(len(qs)), [metrics[q]["chance"] for q in qs], marker="_", s=600,
                   color="C3", label="chance", zorder=3)  # fmt: skip
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% CI)")
        ax.legend(fontsize=8)
        for ax, q in zip(axes[1:], qs, strict=True):
            c = np.array(metrics[q]["confusion"])
            k, names = len(c), metrics[q]["answers"]
            ax.imshow(c, cmap="Blues", vmin=0)
            ax.set_xticks(range(k), names, fontsize=7, rotation=90 if k > 3 else 0)
            ax.set_yticks(range(k), names, fontsize=7)
            ax.set_xlabel("answered")
            ax.set_ylabel("truth")
            ax.set_title(q, fontsize=9)
            for i in range(k):
                for j in range(k):
                    ink = "white" if c[i, j] > c.max() / 2 else "black"
                    ax.text(j, i, str(c[i, j]), ha="center", va="center", color=ink,
                            fontsize=9 if k <= 3 else 6)  # fmt: skip
        fig.suptitle(title, fontsize=10)
