"""Recipe ``export``: a Hub-ready folder (adapter or model + model card) from a training run.

The folder is the recipe's output; the card is built by :mod:`introspect.export`. ``--push``
uploads it to the Hugging Face Hub (the token from ``hf auth login`` or ``$HF_TOKEN``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from introspect.config import Config as _Config

# Neither "dir" nor "file": the CLI still calls --out a directory, and run_recipe writes this
# recipe's config beside the folder (OUT.config.json), not into it, where a config.json is
# the model's own and would be read by transformers.
OUTPUT = "folder"


class Config(_Config):
    run: str = Field(
        description="training run directory (with final/), or a plan's train stage directory "
        "runs/<plan>/<stage>/<hash>"
    )
    which: Literal["best", "final"] = Field(
        "best", description="the run's export to share: best (what evaluations load) or final"
    )
    evals: list[str] = Field(
        [], description="B1 output dirs of this run or its base model (a plan's are found)"
    )
    license: str | None = Field(
        None, description="the card's license (default: the base model's where known)"
    )
    push: str | None = Field(None, description="Hub repo id to upload the folder to (owner/name)")
    private: bool = Field(False, description="with push: create the repo private")


def run(config: Config, out: Path, context) -> dict:
    from introspect.export import export_run, push

    info = export_run(config.run, out, config.which, config.evals, config.license, config.push)
    if config.push:
        info["pushed"] = push(out, config.push, config.private)
    return info


def summary(metrics: dict, out: Path) -> str:
    pushed = f"; pushed: {metrics['pushed']}" if metrics.get("pushed") else ""
    return f"wrote the run's {metrics['export']}/ and its model card to {out}{pushed}"
