"""The `introspect` command line. Thin: each command parses options and calls the science core.

Bad input raises IntrospectError deep down; :func:`main` turns it into one line on stderr and
exit code 2, so a user sees what to fix and not a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cluster.cli_evals import Hosts, hosts_mapper
from cluster.cli_ray import Address
from introspect.errors import IntrospectError

app = typer.Typer(
    help="A lab for training and measuring introspection in language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
vectors_app = typer.Typer(help="Make steering vector sets.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors")
console = Console(stderr=True)

Model = Annotated[str, typer.Option("--model", help="Hugging Face id, local dir, or alias")]
Out = Annotated[Path, typer.Option("--out", help="output path")]


def _floats(text: str, field: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise IntrospectError(f"{field}: {text!r} must be comma-separated numbers") from None


def _load(model: str, adapter: Path | None = None):
    from introspect import models

    with console.status(f"loading {model}"):
        return models.load(model, adapter=adapter)


@vectors_app.command("random")
def vectors_random(
    model: Model,
    out: Out,
    n: Annotated[int, typer.Option(help="number of vectors")] = 200,
    n_train: Annotated[int, typer.Option(help="rows < n_train are for training")] = 100,
    seed: int = 42,
) -> None:
    """Gaussian unit vectors sized for MODEL (same seed, same file)."""
    from introspect import models
    from introspect.vectors import VectorSet, random_vectors, save_vectors

    _, d_model = models.dims(model)
    vs = VectorSet(random_vectors(d_model, n, seed), model=model, kind="random", n_train=n_train)
    save_vectors(out, vs)
    console.print(f"wrote {n} random vectors (d_model={d_model}, {n_train} for training) to {out}")


@vectors_app.command("concepts")
def vectors_concepts(
    model: Model,
    out: Out,
    concepts: Annotated[
        Path | None, typer.Option(help="JSON with 'concepts' and 'templates' lists")
    ] = None,
    layer: Annotated[int | None, typer.Option(help="extraction layer (default 2/3 depth)")] = None,
    batch_size: int = 16,
) -> None:
    """Mean-difference concept vectors read at one layer of MODEL."""
    from introspect.vectors import concept_vectors, default_concepts, read_concepts, save_vectors

    words, templates = read_concepts(concepts) if concepts else default_concepts()
    lm = _load(model)
    with console.status(f"reading {len(words) * len(templates)} prompts"):
        vs = concept_vectors(lm, words, templates, layer, batch_size)
    save_vectors(out, vs)
    console.print(f"wrote {len(words)} concept vectors (layer {vs.layer}) to {out}")


@app.command("data")
def data(
    model: Model,
    vectors: Annotated[Path, typer.Option(help="vector file (.safetensors)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    variant: str = "original",
    n: int = 1000,
    val_fraction: float = 0.1,
    seed: int = 0,
    magnitudes: Annotated[str, typer.Option(help="comma-separated magnitudes")] = "5,10,20,30",
    magnitude_mode: Annotated[
        str, typer.Option(help="absolute, or relative (factors of the residual norm)")
    ] = "absolute",
    prompts: Annotated[Path | None, typer.Option(help="JSON overriding the shipped texts")] = None,
) -> None:
    """Training data for one variant: train.parquet and val.parquet."""
    from introspect import models
    from introspect.activations import residual_norms
    from introspect.data import DataConfig, default_prompts, make_examples, read_prompts, split
    from introspect.examples import write_examples
    from introspect.vectors import load_vectors

    config = DataConfig(
        variant=variant,
        n=n,
        val_fraction=val_fraction,
        seed=seed,
        magnitudes=_floats(magnitudes, "magnitudes"),
        magnitude_mode=magnitude_mode,
    )
    config.validate()
    texts = read_prompts(prompts) if prompts else default_prompts()
    n_layers, d_model = models.dims(model)
    vs = load_vectors(vectors, d_model)
    norms = None
    if magnitude_mode == "relative":
        norms = residual_norms(_load(model), texts["context_prompts"])
    df = make_examples(config, n_layers, vs, texts, norms)
    train, val = split(df, val_fraction, seed)
    write_examples(train, out / "train.parquet")
    write_examples(val, out / "val.parquet")
    meta = {"model": model, "vectors": str(vectors), **vars(config), "norms": norms}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    console.print(f"wrote {len(train)} train / {len(val)} val '{variant}' examples to {out}")


@app.command("score")
def score(
    model: Model,
    examples: Annotated[Path, typer.Option(help="examples (.parquet or .jsonl)")],
    out: Annotated[Path, typer.Option(help="scores file (.parquet)")],
    vectors: Annotated[
        list[Path] | None, typer.Option(help="vector file(s); examples name a set by file stem")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter directory")] = None,
    batch_size: int = 16,
    info_prompt: Annotated[bool, typer.Option(help="prepend the info prompt")] = False,
) -> None:
    """Steer-then-remove scoring: the examples plus p_yes and yes_no_mass."""
    from introspect.data import default_prompts
    from introspect.examples import read_examples, score_examples, write_examples
    from introspect.vectors import load_vectors

    df = read_examples(examples)
    lm = _load(model, adapter)
    sets = {}
    for path in vectors or []:
        vs = load_vectors(path, lm.d_model)
        sets[vs.name] = vs
    info = default_prompts()["info_prompt"] if info_prompt else None
    scores = score_examples(lm, df, sets, batch_size, info, progress=True)
    write_examples(scores, out)
    console.print(
        f"scored {len(scores)} examples → {out} (mean p_yes steered "
        f"{scores[scores.steered].p_yes.mean():.3f}, unsteered "
        f"{scores[~scores.steered].p_yes.mean():.3f})"
    )


@app.command("baseline")
def baseline(
    model: Model,
    vectors: Annotated[Path, typer.Option(help="vector file (.safetensors)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    n_vectors: Annotated[int, typer.Option(help="use the first N vectors")] = 20,
    info_prompt: Annotated[bool, typer.Option(help="prepend the info prompt")] = False,
    magnitudes: Annotated[str, typer.Option(help="comma-separated magnitudes")] = "5,10,20,30",
    magnitude_mode: str = "absolute",
    batch_size: int = 16,
    seed: int = 0,
) -> None:
    """P(yes) steered vs unsteered per layer range × magnitude, balanced trials."""
    from rich.table import Table

    from introspect.activations import residual_norms
    from introspect.baseline import baseline_table, baseline_trials, write_baseline
    from introspect.data import default_prompts
    from introspect.examples import score_examples
    from introspect.vectors import load_vectors

    lm = _load(model)
    vs = load_vectors(vectors, lm.d_model)
    texts = default_prompts()
    norms = residual_norms(lm, texts["context_prompts"]) if magnitude_mode == "relative" else None
    mags = _floats(magnitudes, "magnitudes")
    trials = baseline_trials(vs, n_vectors, lm.n_layers, texts, mags, magnitude_mode, norms, seed)
    info = texts["info_prompt"] if info_prompt else None
    scores = score_examples(lm, trials, {vs.name: vs}, batch_size, info, progress=True)
    table = baseline_table(scores, lm.n_layers)
    config = {
        "model": model,
        "vectors": str(vectors),
        "n_vectors": n_vectors,
        "info_prompt": info_prompt,
        "magnitudes": mags,
        "magnitude_mode": magnitude_mode,
        "seed": seed,
    }
    summary = write_baseline(out, scores, table, config)

    shown = Table(title=f"baseline: {model}, {n_vectors} vectors, info prompt {info_prompt}")
    for col in ("layers", "magnitude", "p_yes s", "p_yes u", "Δ", "AUROC", "mass s/u"):
        shown.add_column(col, justify="right")
    for r in table.itertuples():
        shown.add_row(
            f"{r.layers} [{r.layer_start},{r.layer_end})",
            f"{r.magnitude:g}",
            f"{r.p_yes_steered:.3f}",
            f"{r.p_yes_unsteered:.3f}",
            f"{r.delta:+.3f}",
            f"{r.auroc:.3f}",
            f"{r.mass_steered:.2f}/{r.mass_unsteered:.2f}",
        )
    Console().print(shown)
    o = summary["overall"]
    console.print(
        f"overall: accuracy {o['accuracy']:.3f}, TPR {o['tpr']:.3f}, FPR {o['fpr']:.3f}, "
        f"d′ {o['d_prime']:.2f}, AUROC {o['auroc']:.3f} ({o['n_steered']} steered / "
        f"{o['n_unsteered']} unsteered) → {out}"
    )


eval_app = typer.Typer(help="Evaluation suites.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists, null)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise IntrospectError(f"set: {item!r} must look like key=value")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@app.command("train")
def train_cmd(
    model: Model,
    data: Annotated[Path, typer.Option(help="directory with train.parquet and val.parquet")],
    vectors: Annotated[list[Path], typer.Option(help="vector file(s) the examples refer to")],
    out: Annotated[Path, typer.Option(help="run directory")],
    preset: Annotated[
        str, typer.Option(help="original, vague-prompt, r1-minimal, ...")
    ] = "original",
    steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides epochs)")] = None,
    epochs: Annotated[float | None, typer.Option(help="passes over the training data")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a config field: key=value")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32 / bfloat16 (default by device)")
    ] = None,
) -> None:
    """Detection finetuning (LoRA or full) with checkpoints, resume and a JSONL log."""
    from introspect import models
    from introspect.examples import read_examples
    from introspect.train import TrainingDiverged, train
    from introspect.train import preset as make_preset
    from introspect.vectors import load_vectors

    overrides = _parse_overrides(set_ or [])
    if steps is not None:
        overrides["max_steps"] = steps
    if epochs is not None:
        overrides["epochs"] = epochs
    config = make_preset(preset, **overrides)
    train_df = read_examples(data / "train.parquet")
    val_df = read_examples(data / "val.parquet")
    with console.status(f"loading {model}"):
        lm = models.load(model, dtype=dtype)
    sets = {vs.name: vs for vs in (load_vectors(p, lm.d_model) for p in vectors)}
    try:
        result = train(lm, train_df, val_df, sets, config, out, resume=resume, progress=True)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    console.print(
        f"{result.steps} steps; best val accuracy {result.best_val_accuracy:.3f} at step "
        f"{result.best_step}; final {result.final_val_accuracy:.3f} → {out}"
    )


def _load_evaluated(model: str, adapter: Path | None, dtype: str | None):
    from introspect import models

    with console.status(f"loading {model}"):
        return models.load_evaluated(model, adapter, dtype)


@eval_app.command("detection")
def eval_detection(
    model: Model,
    vectors: Annotated[Path, typer.Option(help="random vector file (train + held-out rows)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    adapter: Annotated[Path | None, typer.Option(help="run dir or adapter/model dir")] = None,
    concepts: Annotated[Path | None, typer.Option(help="concept vector file")] = None,
    n_per_tier: Annotated[
        int, typer.Option(help="steered trials per tier (+ as many unsteered)")
    ] = 200,
    magnitudes: str = "5,10,20,30",
    magnitude_mode: str = "absolute",
    food: Annotated[bool, typer.Option(help="also score the food-control task")] = False,
    info_prompt: bool = False,
    batch_size: int = 16,
    seed: int = 1234,
    dtype: Annotated[
        str | None, typer.Option(help="float32 / bfloat16 (default by device)")
    ] = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B1: accuracy, TPR, FPR, d′, AUROC with intervals per tier; plots."""
    from contextlib import nullcontext

    from rich.table import Table

    from introspect.evals.detection import run_detection

    config = {
        "model": model,
        "vectors": str(vectors),
        "adapter": str(adapter) if adapter else None,
        "concepts": str(concepts) if concepts else None,
        "n_per_tier": n_per_tier,
        "magnitudes": _floats(magnitudes, "magnitudes"),
        "magnitude_mode": magnitude_mode,
        "food": food,
        "info_prompt": info_prompt,
        "batch_size": batch_size,
        "seed": seed,
        "dtype": dtype,
    }
    pool = hosts_mapper(model, adapter, dtype, hosts, address) if hosts else nullcontext()
    with pool as mapper:
        metrics = run_detection(config, out, progress=True, mapper=mapper)

    shown = Table(title=f"B1 detection: {adapter or model}")
    for col in ("tier", "accuracy", "TPR", "FPR", "d′", "AUROC", "n s/u"):
        shown.add_column(col, justify="right")
    rows = list(metrics["tiers"].items()) + (
        [("food", metrics["food"])] if "food" in metrics else []
    )
    for tier, m in rows:
        ci = m["ci"]
        shown.add_row(
            tier,
            f"{m['accuracy']:.3f} [{ci['accuracy'][0]:.2f},{ci['accuracy'][1]:.2f}]",
            f"{m['tpr']:.3f}",
            f"{m['fpr']:.3f}",
            f"{m['d_prime']:.2f}",
            f"{m['auroc']:.3f}",
            f"{m['n_steered']}/{m['n_unsteered']}",
        )
    Console().print(shown)
    console.print(f"wrote metrics.json, summary.md, scores.parquet and plots to {out}")


from cluster.cli_stance import app as stance_app  # noqa: E402 - train, weights, compare

app.add_typer(stance_app, name="stance")


@stance_app.command("patterns")
def stance_patterns(
    responses: Annotated[Path, typer.Option(help="JSONL rows with 'response' (+ 'category')")],
    out: Annotated[Path, typer.Option(help="output directory")],
) -> None:
    """Stance pattern rates per question category with intervals: patterns.json + patterns.png."""
    from introspect.stance.patterns import read_responses, write_patterns

    rows = read_responses(responses)
    result = write_patterns(rows, out)
    overall = result["rates"]["overall"]
    console.print(
        f"{len(rows)} responses: performative {overall['performative_any']['rate']:.1%}, "
        f"pragmatic {overall['pragmatic_any']['rate']:.1%} → {out / 'patterns.json'}"
    )


from cluster import cli_ray  # noqa: E402 - the Ray commands register on the same app
from cluster.cli_evals import register_evals  # noqa: E402 - B2–B7 and Phase C

cli_ray.register(app)
register_evals(app, eval_app)


def main() -> None:
    """Console entry point: IntrospectError becomes one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except IntrospectError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
