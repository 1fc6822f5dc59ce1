"""``introspect stance ...``: train (SFT / DPO), weight-change analysis, the method comparison.

A typer app that ``cluster/cli.py`` mounts as its ``stance`` group (``patterns`` is defined
there). Thin: options are parsed here, the work happens in ``introspect.stance``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from introspect.errors import IntrospectError

app = typer.Typer(help="Epistemic-stance track.", no_args_is_help=True)
console = Console(stderr=True)


def _ints(text: str | None, field: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise IntrospectError(f"{field}: {text!r} must be comma-separated integers") from None


def _words(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@app.command("train")
def train(
    kind: Annotated[str, typer.Argument(help="sft or dpo")],
    out: Annotated[Path, typer.Option(help="run directory")],
    model: Annotated[str, typer.Option(help="Hugging Face id, local dir, or alias")] = (
        "smollm2-135m"
    ),
    corpus: Annotated[
        Path | None,
        typer.Option(help="JSONL (or the seed's training_corpus.json); default: shipped corpus"),
    ] = None,
    method: Annotated[str, typer.Option(help="full, lora, surgical_lora or selective")] = "lora",
    layers: Annotated[
        str | None, typer.Option(help="decoder layers, e.g. 13,14 (surgical_lora / selective)")
    ] = None,
    modules: Annotated[str | None, typer.Option(help="module kinds, e.g. q_proj,v_proj")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    beta: Annotated[float | None, typer.Option(help="DPO β")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any other config field: key=value")
    ] = None,
) -> None:
    """Fine-tune on a stance corpus; writes the artifact, log.jsonl and result.json to --out."""
    from cluster.cli import _parse_overrides
    from introspect import models
    from introspect.evals.common import parse_config
    from introspect.stance import corpus as corpora
    from introspect.train import TrainingDiverged

    if kind not in ("sft", "dpo"):
        raise IntrospectError(f"kind: {kind!r} must be sft or dpo")
    settings = _parse_overrides(set_ or []) | {"method": method}
    given = {
        "layers": _ints(layers, "layers"),
        "modules": _words(modules),
        "max_steps": steps,
        "lr": lr,
        "beta": beta,
    }
    settings |= {k: v for k, v in given.items() if v is not None}
    path = corpus or corpora.shipped("sft" if kind == "sft" else "pairs")
    if kind == "sft":
        from introspect.stance.sft import SFTRunConfig, train_sft

        config, rows, fn = parse_config(SFTRunConfig, settings), corpora.read_sft(path), train_sft
    else:
        from introspect.stance.dpo import DPORunConfig, train_dpo

        config, rows, fn = parse_config(DPORunConfig, settings), corpora.read_pairs(path), train_dpo
    with console.status(f"loading {model}"):
        lm = models.load(model)
    try:
        result = fn(lm, rows, config, out)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    st = result.stability()
    console.print(
        f"{kind} {config.method}: {result.steps} steps in {result.train_seconds:.0f} s, "
        f"{result.trainable_params:,} trainable parameters, loss {st['first']:.3f} → "
        f"{st['final']:.3f}, artifact {result.artifact_bytes / 2**20:.2f} MiB → {out}"
    )


@app.command("weights")
def weights(
    run: Annotated[Path, typer.Option(help="run directory or its artifact/ (from stance train)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    base: Annotated[
        str | None, typer.Option(help="base model (default: the one the artifact names)")
    ] = None,
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
) -> None:
    """Per-module ΔW of a trained artifact vs its base: weight_changes.json + heatmap PNG."""
    from introspect import models
    from introspect.stance.tuning import load_tuned
    from introspect.stance.weights import analyse, write_analysis

    with console.status("loading the tuned and the base model"):
        tuned = load_tuned(run, base, device="cpu")
        base_lm = models.load(base or tuned.name, device="cpu")
    df = analyse(base_lm.model, tuned.model)
    written = write_analysis(df, out, f"{run.name}: weight change vs {base_lm.name}")
    table = Table("rank", "module", "‖ΔW‖/‖W‖", "stable rank", "effective rank")
    for r in df.head(top).itertuples():
        table.add_row(
            str(r.rank),
            r.module,
            f"{r.relative:.3e}",
            f"{r.stable_rank:.1f}",
            f"{r.effective_rank:.1f}",
        )
    Console().print(table)
    console.print(f"{len(df)} changed modules → {', '.join(str(p) for p in written.values())}")


@app.command("compare")
def compare(
    out: Annotated[Path, typer.Option(help="output directory")],
    config: Annotated[
        Path | None, typer.Option(help="YAML or JSON with the comparison's settings")
    ] = None,
    model: Annotated[str | None, typer.Option(help="overrides the config's model")] = None,
    steps: Annotated[int | None, typer.Option(help="overrides max_steps of every run")] = None,
) -> None:
    """Full FT vs distributed LoRA vs surgical LoRA vs selective unfreezing vs DPO."""
    from introspect.stance.compare import run_stance_comparison

    settings = _read_config(config) if config is not None else {}
    if model is not None:
        settings["model"] = model
    if steps is not None:
        settings["max_steps"] = steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = run_stance_comparison(settings, out)
    table = Table("run", "trainable", "train s", "final loss", "performative", "pragmatic")
    for name, r in metrics["runs"].items():
        overall = (r["behaviour"]["rates"] or {}).get("overall", {})
        share = [
            f"{overall[k]['rate']:.2f}" if k in overall else "n/a"
            for k in ("performative_any", "pragmatic_any")
        ]
        table.add_row(
            name,
            f"{r['trainable_params']:,}",
            f"{r['train_seconds']:.0f}",
            f"{r['stability']['final']:.3f}",
            *share,
        )
    Console().print(table)
    console.print(f"{metrics['seconds'] / 60:.1f} min → {out / 'summary.md'}")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise IntrospectError(f"config: {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types
        raise IntrospectError(f"config: {path} cannot be parsed ({e})") from None
    if not isinstance(data, dict):
        raise IntrospectError(f"config: {path} must hold a mapping of settings")
    return data
