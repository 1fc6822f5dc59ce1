"""What each kind of plan stage does, given its validated config and its inputs' directories.

Every function here takes ``(plan, name, out, inputs)`` (``inputs`` maps a referenced stage to its
finished output directory), writes into ``out`` and returns the stage's metrics. The science is in
``introspect``; these functions only wire files together. Training stages build Ray Train jobs;
the rest run inside the Ray task the runner gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

from introspect.errors import IntrospectError
from pipelines.plan import BASE, Plan


def _write_summary(out: Path, text: str) -> None:
    (out / "summary.md").write_text(text)


def vectors_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path]) -> dict:
    from introspect import models
    from introspect.vectors import (
        VectorSet,
        concept_vectors,
        default_concepts,
        random_vectors,
        save_vectors,
    )

    stage = plan.stages[name]
    model = plan.stage_model(name)
    if stage.type == "random":
        _, d_model = models.dims(model)
        n_train = stage.n_train if stage.n_train is not None else stage.n // 2
        vs = VectorSet(random_vectors(d_model, stage.n, stage.seed), model, "random", n_train)
    else:
        words, templates = default_concepts()
        lm = models.load(model)
        vs = concept_vectors(lm, words[: stage.n], templates, stage.layer)
    vs.name = name
    save_vectors(out / f"{name}.safetensors", vs)
    kind = f"{vs.vectors.shape[0]} {stage.type} vectors, d_model {vs.vectors.shape[1]}"
    _write_summary(out, f"### Vectors `{name}`\n\n{kind} for {model}.\n")
    return {"n": int(vs.vectors.shape[0]), "d_model": int(vs.vectors.shape[1]), "kind": stage.type}


def vector_file(inputs: dict[str, Path], stage_name: str) -> str:
    """The vector file a vectors stage wrote; the set is named by the file's stem."""
    return str(inputs[stage_name] / f"{stage_name}.safetensors")


def data_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path]) -> dict:
    from introspect import models
    from introspect.activations import residual_norms
    from introspect.data import DataConfig, default_prompts, make_examples, split
    from introspect.examples import write_examples
    from introspect.vectors import load_vectors

    stage = plan.stages[name]
    model = plan.stage_model(name)
    config = DataConfig(
        variant=stage.variant,
        n=stage.n,
        val_fraction=stage.val_fraction,
        seed=stage.seed,
        magnitudes=stage.magnitudes,
        magnitude_mode=stage.magnitude_mode,
    )
    try:
        config.validate()
    except IntrospectError as e:
        raise IntrospectError(f"stages.{name}.{e}") from None
    texts = default_prompts()
    n_layers, d_model = models.dims(model)
    vs = load_vectors(vector_file(inputs, stage.vectors), d_model)
    norms = (
        residual_norms(models.load(model), texts["context_prompts"])
        if (stage.magnitude_mode == "relative")
        else None
    )
    train, val = split(make_examples(config, n_layers, vs, texts, norms), stage.val_fraction, 0)
    write_examples(train, out / "train.parquet")
    write_examples(val, out / "val.parquet")
    meta = {"model": model, "vectors": stage.vectors, **vars(config), "norms": norms}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    _write_summary(
        out,
        f"### Data `{name}`\n\n{len(train)} training / {len(val)} validation examples, variant "
        f"`{stage.variant}`, magnitudes {stage.magnitudes} ({stage.magnitude_mode}).\n",
    )
    return {"n_train": len(train), "n_val": len(val), "variant": stage.variant}


def _train_job(plan: Plan, name: str, inputs: dict[str, Path], storage: str):
    from introspect.train import preset
    from pipelines.train_job import TrainJob

    stage = plan.stages[name]
    data_dir = inputs[stage.data]
    data_stage_cfg = plan.stages[stage.data]
    vector_stages = stage.vectors or [data_stage_cfg.vectors]
    try:
        config = preset(stage.preset, **stage.overrides)
    except IntrospectError as e:
        raise IntrospectError(f"stages.{name}.overrides.{e}") from None
    if config.data_variant != data_stage_cfg.variant:
        raise IntrospectError(
            f"stages.{name}.data: preset {stage.preset!r} expects {config.data_variant!r} data, "
            f"{stage.data!r} is {data_stage_cfg.variant!r}"
        )
    return TrainJob(
        name=f"{plan.name}-{name}",
        model=plan.stage_model(name),
        train_data=str(data_dir / "train.parquet"),
        val_data=str(data_dir / "val.parquet"),
        vectors=[vector_file(inputs, v) for v in vector_stages],
        config=config,
        storage_path=storage,
        num_workers=stage.num_workers,
        use_gpu=plan.resources.use_gpu,
        cpus_per_worker=plan.resources.cpus_per_worker,
        dtype=plan.resources.dtype,
        max_failures=plan.resources.max_failures,
    )


def train_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path], storage: str) -> dict:
    from pipelines.train_job import run_train_job

    job = _train_job(plan, name, inputs, storage)
    metrics = run_train_job(job, out / "run")
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    _training_curves(log, out / "curves.png", f"training: {name}")
    _write_summary(
        out,
        f"### Training `{name}` ({plan.stages[name].preset})\n\n"
        f"{metrics['steps']} steps; best validation accuracy {metrics['best_val_accuracy']:.3f} "
        f"(step {metrics['best_step']}), final {metrics['final_val_accuracy']:.3f}; "
        f"wall {metrics['wall_s']:.0f} s on {job.num_workers} worker(s).\n\n"
        "![training curves](curves.png)\n",
    )
    return metrics


def _training_curves(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in log]
    a.plot(steps, [r["loss"] for r in log], lw=1, label="train loss")
    val = [r for r in log if "val_loss" in r]
    a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", color="C2")
    b.set_ylim(0, 1.02)
    b.axhline(0.5, color="grey", ls=":", lw=1)
    b.set_xlabel("step")
    b.set_ylabel("validation accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path], storage: str) -> dict:
    from introspect.tables import markdown_table
    from pipelines.sweep import Sweep, run_sweep

    stage = plan.stages[name]
    sweep = Sweep(
        job=_train_job(plan, name, inputs, storage),
        lora_r=stage.lora_r,
        lr=stage.lr,
        search=stage.search,
        num_samples=stage.num_samples,
    )
    table = run_sweep(sweep, out)
    best = json.loads((out / "best.json").read_text())
    _write_summary(
        out,
        f"### Sweep `{name}`: LoRA rank × learning rate (ASHA on validation loss)\n\n"
        + markdown_table(table)
        + f"\nBest: rank {best['lora_r']}, lr {best['lr']:g} (validation loss "
        f"{best['val_loss']:.4f}).\n",
    )
    return {"best": best, "trials": len(table)}


def _suite_function(suite: str):
    from importlib import import_module

    module, fn = {
        "detection": ("introspect.evals.detection", "run_detection"),
        "behavioral": ("introspect.evals.behavioral", "run_behavioral"),
        "identity": ("introspect.evals.identity", "run_identity"),
        "self-prediction": ("introspect.evals.self_prediction", "run_self_prediction"),
        "calibration": ("introspect.evals.calibration", "run_calibration"),
        "concepts": ("introspect.evals.concepts", "run_concepts"),
        "localization": ("introspect.evals.localization", "run_localization"),
    }[suite]
    return getattr(import_module(module), fn)


def eval_config(plan: Plan, name: str, model_ref: str, inputs: dict[str, Path]) -> dict:
    """The suite's config for one model of an eval stage."""
    stage = plan.stages[name]
    config = dict(stage.options)
    config["model"] = plan.stage_model(name)
    if model_ref != BASE:
        config["adapter"] = str(inputs[model_ref] / "run")
    config["label"] = model_ref  # "base" or the training stage, not an adapter path
    if stage.suite == "detection":
        if not stage.vectors:
            raise IntrospectError(f"stages.{name}.vectors: detection needs a random vector stage")
        config["vectors"] = vector_file(inputs, stage.vectors[0])
        if len(stage.vectors) > 1:
            config["concepts"] = vector_file(inputs, stage.vectors[1])
    elif stage.vectors:
        config["vectors"] = vector_file(inputs, stage.vectors[0])
    return config


def eval_one(
    plan: Plan, name: str, model_ref: str, out: Path, inputs: dict[str, Path], pool=None
) -> dict:
    """One suite on one model: in this process, or on ``pool`` (:func:`stage_pool`) under the
    model's adapter (the runner runs the models of a stage side by side, or in turn on a pool)."""
    from pipelines.fanout import pool_adapter, pool_mapper

    stage = plan.stages[name]
    fn = _suite_function(stage.suite)
    out.mkdir(parents=True, exist_ok=True)
    try:
        config = eval_config(plan, name, model_ref, inputs)
        if pool is None:
            return fn(config, out)
        adapter = pool_adapter(config["model"], config.get("adapter"))
        return fn(config, out, mapper=pool_mapper(pool, adapter, progress=False))
    except IntrospectError as e:
        raise IntrospectError(f"stages.{name} ({model_ref}): {e}") from None


def stage_pool(plan: Plan, name: str):
    """The host pool of an eval stage with ``hosts: N``: N hosts of the stage's base model, one
    GPU each on a GPU cluster (else ``cpus_per_worker`` CPUs each); close it when done."""
    from pipelines.fanout import eval_pool

    stage = plan.stages[name]
    try:
        return eval_pool(
            plan.stage_model(name),
            stage.hosts,
            num_cpus=plan.resources.cpus_per_worker,
            dtype=stage.options.get("dtype"),  # what each model's own load would use
        )
    except IntrospectError as e:
        raise IntrospectError(f"stages.{name}.{e}") from None


def stance_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path]) -> dict:
    from introspect.stance.compare import run_stance_comparison

    config = {"model": plan.stage_model(name), **plan.stages[name].config}
    return run_stance_comparison(config, out)


def localize_stage(plan: Plan, name: str, out: Path, inputs: dict[str, Path]) -> dict:
    from introspect.localize_train import run_localization_training

    config = {"model": plan.stage_model(name), **plan.stages[name].config}
    return run_localization_training(config, out)
