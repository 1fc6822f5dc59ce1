"""Recipe ``localize`` (Phase C): train which-layers / how-strong / which-sentence answers with
the detection loop, then B7 on the trained model (and the untrained one)."""

from __future__ import annotations

from pathlib import Path

from introspect.localize_train import LocalizeTrainConfig as Config  # noqa: F401 - the contract
from pipelines.recipes.evals import accuracies


def run(config, out: Path, context) -> dict:
    from introspect.localize_train import run_localization_training

    return run_localization_training(config, out, progress=context.progress)


def summary(metrics: dict, out: Path) -> str:
    before = f"before: {accuracies(metrics['before'])}; " if metrics.get("before") else ""
    return (
        f"Phase C {before}after: {accuracies(metrics['after'])}\n"
        f"wrote metrics.json, summary.md and plots to {out}"
    )
