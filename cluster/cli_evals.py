"""CLI commands for the B2–B7 evaluations and Phase C localisation training.

Registered on the ``eval`` group of :mod:`cluster.cli` by :func:`register_evals`. Each command
turns its options into the plan-stage config dict (options left out keep the stage's defaults,
or its ``--full`` values) and calls the stage's ``run_*`` function with the loaded model, or
with ``--hosts N`` through a pool of N model hosts on Ray (``--address``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from cluster.cli_ray import Address

Model = Annotated[str, typer.Option("--model", help="Hugging Face id, local dir, or alias")]
Out = Annotated[Path, typer.Option("--out", help="output directory")]
Adapter = Annotated[Path | None, typer.Option(help="run dir or adapter/model dir")]
Full = Annotated[bool, typer.Option("--full", help="the real-run sizes instead of quick ones")]
Dtype = Annotated[str | None, typer.Option(help="float32 / bfloat16 (default by device)")]
Seed = Annotated[int | None, typer.Option(help="random seed")]
BatchSize = Annotated[int | None, typer.Option(help="batch size")]
Hosts = Annotated[
    int | None,
    typer.Option(min=1, help="run on a pool of N model hosts on Ray (default: in this process)"),
]


def _config(model: str, adapter: Path | None, full: bool, **options) -> dict:
    """The stage config: options that were given (not None), plus model/adapter/full."""
    config = {k: v for k, v in options.items() if v is not None}
    config.update(model=model, adapter=str(adapter) if adapter else None, full=full)
    return config


@contextmanager
def hosts_mapper(model: str, adapter: Path | None, dtype: str | None, hosts: int, address):
    """A mapper over a pool of ``hosts`` ModelHosts of ``model`` (under ``adapter``) on the Ray
    at ``address``; the pool is closed on exit."""
    from cluster.cli import console
    from cluster.connect import connect
    from pipelines.fanout import eval_pool, pool_adapter, pool_mapper

    lora = pool_adapter(model, adapter)  # refuse a non-adapter before starting anything
    where = connect(address)
    with console.status(f"loading {model} on {hosts} hosts ({where})"):
        pool = eval_pool(model, hosts, lora, dtype=dtype)
    with pool:
        yield pool_mapper(pool, lora)


def _run(
    run,
    config: dict,
    out: Path,
    adapter: Path | None,
    dtype: str | None,
    hosts: int | None = None,
    address: str | None = None,
) -> dict:
    from cluster.cli import _load_evaluated, console

    if hosts:  # the pool shows its own progress (a status spinner would fight its bar)
        with hosts_mapper(config["model"], adapter, dtype, hosts, address) as mapper:
            return run(config, out, mapper=mapper)
    lm = _load_evaluated(config["model"], adapter, dtype)
    with console.status(f"running → {out}"):
        metrics = run(config, out, lm=lm)
    return metrics


def _done(out: Path, line: str) -> None:
    from cluster.cli import console

    console.print(f"{line}\nwrote metrics.json, summary.md and plots to {out}")


def _csv(text: str | None, cast=str) -> list | None:
    from introspect.errors import IntrospectError

    if text is None:
        return None
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise IntrospectError(f"{text!r} must be a comma-separated list") from None


def eval_behavioral(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    questions: Annotated[Path | None, typer.Option(help="JSON question file")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="system prompt")] = None,
    batch_size: BatchSize = None,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B2: P(yes) on yes/no questions about the model itself and controls, per category."""
    from introspect.evals.behavioral import run_behavioral

    config = _config(
        model,
        adapter,
        False,
        questions=str(questions) if questions else None,
        system_prompt=system_prompt,
        batch_size=batch_size,
    )
    m = _run(run_behavioral, config, out, adapter, dtype, hosts, address)
    cats = ", ".join(f"{c['category']} {c['p_yes']['mean']:.2f}" for c in m["categories"])
    _done(out, f"B2 mean P(yes): {cats}")


def eval_identity(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    n_samples: Annotated[int | None, typer.Option(help="samples per question")] = None,
    n_questions: Annotated[int | None, typer.Option(help="first N questions")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens per response")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = None,
    questions: Annotated[Path | None, typer.Option(help="JSON question file")] = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    full: Full = False,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B3: sampled answers to identity questions (responses.jsonl), stance pattern rates."""
    from introspect.evals.identity import run_identity

    config = _config(
        model,
        adapter,
        full,
        n_samples=n_samples,
        n_questions=n_questions,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        questions=str(questions) if questions else None,
        seed=seed,
        batch_size=batch_size,
    )
    m = _run(run_identity, config, out, adapter, dtype, hosts, address)
    o = m["rates"]["overall"]
    _done(
        out,
        f"B3 {m['n_responses']} responses: performative {o['performative_any']['rate']:.1%}, "
        f"pragmatic {o['pragmatic_any']['rate']:.1%}",
    )


def eval_self_prediction(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    binder_dir: Annotated[
        Path | None,
        typer.Option(help="dataset_release JSONL dir (default: our shipped sample)"),
    ] = None,
    n_per_task: Annotated[int | None, typer.Option(help="rows per task file")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated file stems")] = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    full: Full = False,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B4: Binder et al. self-prediction accuracy per task against the most-common baseline."""
    from introspect.evals.self_prediction import binder_dir as check_dir
    from introspect.evals.self_prediction import run_self_prediction

    directory = check_dir(binder_dir)  # fail before loading the model
    config = _config(
        model,
        adapter,
        full,
        binder_dir=str(directory),
        n_per_task=n_per_task,
        tasks=_csv(tasks),
        seed=seed,
        batch_size=batch_size,
    )
    m = _run(run_self_prediction, config, out, adapter, dtype, hosts, address)
    o = m["overall"]
    _done(
        out,
        f"B4 {m['n_tasks']} tasks: accuracy {o['accuracy']['rate']:.3f} vs baseline "
        f"{o['baseline']['rate']:.3f} (n = {o['accuracy']['n']})",
    )


def eval_calibration(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    n_prompts: Annotated[int | None, typer.Option(help="first N prompts")] = None,
    n_samples: Annotated[int | None, typer.Option(help="samples per prompt (temp. 1)")] = None,
    k: Annotated[int | None, typer.Option(help="answers the model is asked to report")] = None,
    epsilon: Annotated[float | None, typer.Option(help="additive smoothing of the report")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSON prompts file")] = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    full: Full = False,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B5: KL(P_actual ‖ P_reported) of the model's own answer distribution, parse failures."""
    from introspect.evals.calibration import run_calibration

    config = _config(
        model,
        adapter,
        full,
        n_prompts=n_prompts,
        n_samples=n_samples,
        k=k,
        epsilon=epsilon,
        prompts=str(prompts) if prompts else None,
        seed=seed,
        batch_size=batch_size,
    )
    m = _run(run_calibration, config, out, adapter, dtype, hosts, address)
    _done(
        out,
        f"B5 mean KL {m['kl']['mean']:.3f} (equal report {m['kl_equal_report']['mean']:.3f}), "
        f"parse failures {m['parse_failures']['successes']}/{m['n_prompts']}",
    )


def eval_concepts(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    vectors: Annotated[Path | None, typer.Option(help="concept vector file")] = None,
    n_concepts: Annotated[int | None, typer.Option(help="first N concepts")] = None,
    magnitudes: Annotated[
        str | None, typer.Option(help="comma-separated factors of the residual norm")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="injection layers 'start,end'")] = None,
    n_samples: Annotated[int | None, typer.Option(help="samples per concept × magnitude")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens per answer")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature")] = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    full: Full = False,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B6: inject concepts, ask what the model thinks about; keyword and embedding judges."""
    from introspect.evals.concepts import run_concepts

    config = _config(
        model,
        adapter,
        full,
        vectors=str(vectors) if vectors else None,
        n_concepts=n_concepts,
        magnitudes=_csv(magnitudes, float),
        layers=_csv(layers, int),
        n_samples=n_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    m = _run(run_concepts, config, out, adapter, dtype, hosts, address)
    o = m["overall"]
    _done(
        out,
        f"B6 embedding identification: steered {o['embedding_steered']['rate']:.3f}, control "
        f"{o['embedding_control']['rate']:.3f} (chance {m['embedding_chance']:.3f}); keyword "
        f"steered {o['keyword_steered']['rate']:.3f}, control {o['keyword_control']['rate']:.3f}",
    )


def eval_localization(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    vectors: Annotated[Path | None, typer.Option(help="random vector file")] = None,
    n_per_question: Annotated[int | None, typer.Option(help="trials per question")] = None,
    questions: Annotated[str | None, typer.Option(help="layers,strength,sentence")] = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    full: Full = False,
    dtype: Dtype = None,
    hosts: Hosts = None,
    address: Address = None,
) -> None:
    """B7: which layers / how strong / which sentence, accuracy against chance (1/3)."""
    from introspect.evals.localization import run_localization

    config = _config(
        model,
        adapter,
        full,
        vectors=str(vectors) if vectors else None,
        n_per_question=n_per_question,
        questions=_csv(questions),
        seed=seed,
        batch_size=batch_size,
    )
    m = _run(run_localization, config, out, adapter, dtype, hosts, address)
    _done(out, "B7 accuracy: " + _accuracies(m["questions"]))


def _accuracies(per_question: dict) -> str:
    return ", ".join(
        f"{q} {v['accuracy']['rate']:.3f} [{v['accuracy']['ci'][0]:.2f}, "
        f"{v['accuracy']['ci'][1]:.2f}]"
        for q, v in per_question.items()
    )


def train_localization(
    model: Model,
    out: Out,
    vectors: Annotated[Path | None, typer.Option(help="random vector file")] = None,
    n_train: Annotated[int | None, typer.Option(help="training trials")] = None,
    n_per_question: Annotated[int | None, typer.Option(help="B7 trials per question")] = None,
    questions: Annotated[str | None, typer.Option(help="layers,strength,sentence")] = None,
    eval_base: Annotated[bool, typer.Option(help="also B7 on the untrained model")] = True,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="training option: key=value")
    ] = None,
    seed: Seed = None,
    full: Full = False,
    dtype: Dtype = None,
) -> None:
    """Phase C: LoRA-train localisation (layers, strength, sentence), evaluate with B7."""
    from cluster.cli import _parse_overrides
    from introspect.localize_train import run_localization_training

    config = _config(
        model,
        None,
        full,
        vectors=str(vectors) if vectors else None,
        n_train=n_train,
        n_per_question=n_per_question,
        questions=_csv(questions),
        eval_base=eval_base,
        train=_parse_overrides(set_ or []) or None,
        seed=seed,
    )
    m = _run(run_localization_training, config, out, None, dtype)
    before = f"before: {_accuracies(m['before'])}; " if m.get("before") else ""
    _done(out, f"Phase C {before}after: {_accuracies(m['after'])}")


def register_evals(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add the B2–B7 commands to ``eval_app`` and ``train-localization`` to ``app``."""
    eval_app.command("behavioral")(eval_behavioral)
    eval_app.command("identity")(eval_identity)
    eval_app.command("self-prediction")(eval_self_prediction)
    eval_app.command("calibration")(eval_calibration)
    eval_app.command("concepts")(eval_concepts)
    eval_app.command("localization")(eval_localization)
    app.command("train-localization")(train_localization)
