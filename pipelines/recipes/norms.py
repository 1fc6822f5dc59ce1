"""Recipe ``norms``: a model's mean residual norm per layer, measured once for a whole plan.

Relative steering magnitudes are factors of these norms. Measuring them means loading the
model: a plan's data stages read one norms stage instead of each loading the model again (at
32B, four data stages at once would put four copies on one GPU).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from introspect.config import ModelChoice


class Config(ModelChoice):
    prompts: str | None = Field(None, description="JSON overriding the shipped texts")


def run(config: Config, out: Path, context) -> dict:
    from introspect import models
    from introspect.activations import residual_norms
    from introspect.data import default_prompts, read_prompts
    from introspect.io import write_json

    texts = read_prompts(config.prompts) if config.prompts else default_prompts()
    lm = models.load(config.model, dtype=config.dtype)
    norms = residual_norms(lm, texts["context_prompts"])
    record = {"model": config.model, "norms": norms}
    write_json(out / "norms.json", record)
    (out / "summary.md").write_text(
        f"### Residual norms `{context.name or out.name}`\n\n{config.model}: mean residual norm "
        f"{norms[0]:.1f} at layer 0 up to {max(norms):.1f}, over {len(norms)} layers.\n"
    )
    return {"n_layers": len(norms), "min": min(norms), "max": max(norms)}


def read_norms(path: str | Path, model: str, n_layers: int) -> list[float]:
    """A norms stage's ``norms.json``, checked to be for ``model`` and its depth."""
    import json

    from introspect.errors import IntrospectError

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IntrospectError(f"norms: {path} is not a readable norms file ({e})") from None
    norms = record.get("norms") if isinstance(record, dict) else None
    if not isinstance(norms, list) or record.get("model") != model or len(norms) != n_layers:
        held = record.get("model") if isinstance(record, dict) else None
        raise IntrospectError(
            f"norms: {path} holds no norms of the {n_layers} layers of {model!r} (it is for "
            f"{held!r})"
        )
    return [float(x) for x in norms]


def summary(metrics: dict, out: Path) -> str:
    span = f"{metrics['min']:.1f}-{metrics['max']:.1f}"
    return f"residual norms of {metrics['n_layers']} layers ({span}) in {out}"
