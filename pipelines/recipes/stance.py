"""Recipes ``stance.*``: fine-tune a stance (SFT / DPO), measure which weights changed, compare
the methods (seed 003), rate stance patterns in responses. Configs and runs live in
:mod:`introspect.stance`."""

from __future__ import annotations

from pipelines.recipes import Delegate


def _line(module: str):
    def line(metrics: dict) -> str:
        import importlib

        return importlib.import_module(module).summary_line(metrics)

    return line


def _table(rows: list[dict]) -> str:
    from introspect.io import markdown_table

    return markdown_table(rows, list(rows[0])) if rows else ""


def _with_table(module: str, key: str):
    def line(metrics: dict) -> str:
        return _table(metrics.get(key, [])) + _line(module)(metrics)

    return line


train = Delegate(
    "introspect.stance.train", "StanceTrainConfig", "run_stance_train",
    _line("introspect.stance.train"),
)  # fmt: skip
weights = Delegate(
    "introspect.stance.weights", "StanceWeightsConfig", "run_stance_weights",
    _with_table("introspect.stance.weights", "top"),
)  # fmt: skip
compare = Delegate(
    "introspect.stance.compare", "CompareConfig", "run_stance_comparison",
    _with_table("introspect.stance.compare", "overview"),
)  # fmt: skip
patterns = Delegate(
    "introspect.stance.judges", "StancePatternsConfig", "run_stance_patterns",
    _line("introspect.stance.judges"),
)  # fmt: skip
