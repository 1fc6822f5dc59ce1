"""Recipe ``score``: the steer-then-remove forward over an examples file: p_yes, yes_no_mass."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from introspect.config import ModelChoice

OUTPUT = "file"  # a scores .parquet


class Config(ModelChoice):
    examples: str = Field(description="examples file (.parquet or .jsonl)")
    vectors: list[str] = Field([], description="vector file(s); examples name a set by file stem")
    adapter: str | None = Field(None, description="run dir, adapter or fine-tuned model dir")
    batch_size: int = Field(16, ge=1, description="examples per forward pass")
    info_prompt: bool = Field(False, description="prepend the info prompt")


def run(config: Config, out: Path, context) -> dict:
    from introspect.data import default_prompts
    from introspect.examples import read_examples, score_examples, write_examples
    from introspect.runs import load_evaluated
    from introspect.vectors import load_vectors

    df = read_examples(config.examples)
    lm = load_evaluated(config.model, config.adapter, config.dtype)
    sets = {vs.name: vs for vs in (load_vectors(p, lm.d_model) for p in config.vectors)}
    info = default_prompts()["info_prompt"] if config.info_prompt else None
    scores = score_examples(lm, df, sets, config.batch_size, info, progress=context.progress)
    write_examples(scores, out)
    return {
        "n": len(scores),
        "p_yes_steered": float(scores[scores.steered].p_yes.mean()),
        "p_yes_unsteered": float(scores[~scores.steered].p_yes.mean()),
    }


def summary(metrics: dict, out: Path) -> str:
    return (
        f"scored {metrics['n']} examples → {out} (mean p_yes steered "
        f"{metrics['p_yes_steered']:.3f}, unsteered {metrics['p_yes_unsteered']:.3f})"
    )
