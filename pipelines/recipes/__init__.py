"""Recipes: every runnable of the lab, each one module with one config and one ``run``.

A recipe module defines ``Config`` (an :class:`introspect.config.Config`), ``run(config, out,
context) -> dict`` (its metrics) and, optionally, ``summary(metrics, out) -> str`` (the line a
command prints). ``out`` is a directory, or a file for the recipes whose output is one file
(``OUTPUT = "file"``: vectors, score). The registry below names them; the command line
(:mod:`cluster.cli`) and plans (:mod:`pipelines.plan`) are both built from it, so a field has one
definition, one default and one validation whichever way a recipe is started.

Modules are imported when a recipe is used, not when the registry is read: ``introspect
--help`` stays fast, and a plan imports only the science its stages need.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

from introspect.config import Config, parse
from introspect.io import write_text


@dataclass
class TrainEngine:
    """How a plan runs a training: a Ray Train job with these resources (see
    :class:`pipelines.train_job.TrainJob`). Without one a recipe trains in its own process."""

    name: str
    storage_path: str
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2


@dataclass
class Context:
    """What a recipe may use from whoever runs it (a command, a plan stage, a notebook)."""

    name: str | None = None  # the plan stage (or None), for summaries
    progress: Callable[[int, int], None] | None = None  # called (done, total) on long work
    mapper: Callable | None = None  # evaluations: fan shards out over model hosts
    train: TrainEngine | None = None  # trainings: run on Ray Train instead of in process
    device: str | None = None  # where its models run when not here ("cuda" on a GPU plan)


@dataclass(frozen=True)
class Recipe:
    name: str  # e.g. "eval.detection"
    module: str  # "pkg.mod" holding Config, run (and summary), or "pkg.mod:obj" for an object in it
    help: str  # one line, shown by `introspect --help` without importing the module

    @cached_property
    def _mod(self) -> ModuleType | Any:
        module, _, attr = self.module.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr.replace("-", "_")) if attr else mod

    @property
    def config(self) -> type[Config]:
        return self._mod.Config

    @property
    def output(self) -> str:
        return getattr(self._mod, "OUTPUT", "dir")

    def parse(self, data: Any, where: str = "") -> Config:
        return parse(self.config, data, where)

    def run(self, config: Config, out: Path, context: Context | None = None) -> dict:
        return self._mod.run(config, Path(out), context or Context())

    def summary(self, metrics: dict, out: Path) -> str:
        fn = getattr(self._mod, "summary", None)
        return fn(metrics, out) if fn else f"wrote {out}"


@dataclass(frozen=True)
class Delegate:
    """A recipe whose config and run function live with their science: ``config`` and ``run``
    name them in ``module``; ``line(metrics)`` is the line a command prints. The run function
    gets the context's ``mapper`` and ``progress`` where it takes them."""

    module: str
    config_name: str
    run_name: str
    line: Callable[[dict], str]
    wrote: str = ""  # what the printed line adds after the result, e.g. "metrics.json"

    @cached_property
    def _mod(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def Config(self) -> type[Config]:  # noqa: N802 - the recipe contract's name
        return getattr(self._mod, self.config_name)

    def run(self, config: Config, out: Path, context: Context) -> dict:
        import inspect

        fn = getattr(self._mod, self.run_name)
        takes = inspect.signature(fn).parameters
        extra = {k: getattr(context, k) for k in ("mapper", "progress") if k in takes}
        return fn(config, out, **extra)

    def summary(self, metrics: dict, out: Path) -> str:
        return self.line(metrics) + (f"\nwrote {self.wrote} to {out}" if self.wrote else "")


def _suite(suite: str, help: str) -> Recipe:
    return Recipe(f"eval.{suite}", f"pipelines.recipes.evals:{suite}", help)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("vectors", "pipelines.recipes.vectors", "Make a steering vector set."),
        Recipe("norms", "pipelines.recipes.norms", "A model's residual norm per layer."),
        Recipe("data", "pipelines.recipes.data", "Training data for one variant."),
        Recipe("score", "pipelines.recipes.score", "Steer-then-remove scoring of examples."),
        Recipe("baseline", "pipelines.recipes.baseline", "The base model's P(yes), steered."),
        Recipe("train", "pipelines.recipes.train", "Detection finetuning (LoRA or full)."),
        Recipe("sweep", "pipelines.recipes.sweep", "LoRA rank × learning rate on Ray Tune."),
        Recipe("localize", "pipelines.recipes.localize", "Phase C: localisation training."),
        Recipe("export", "pipelines.recipes.export", "A Hub-ready folder + model card of a run."),
        _suite("detection", "B1: detection accuracy, TPR, FPR, d′, AUROC per tier."),
        _suite("behavioral", "B2: P(yes) on questions about the model itself."),
        _suite("identity", "B3: open identity questions, stance patterns."),
        _suite("self-prediction", "B4: Binder et al.'s self-prediction tasks."),
        _suite("calibration", "B5: reported vs actual answer distributions."),
        _suite("concepts", "B6: which concept was injected (keyword + embedding judges)."),
        _suite("localization", "B7: which layers / how strong / which sentence."),
        _suite("yes-bias", "Control: P(yes) on unrelated questions, steered vs unsteered."),
        _suite("input-control", "Control: is perturbed text read as steering?"),
        _suite("side-effects", "Control: capability exact match and B2 self-attribution."),
        _suite("susceptibility", "Control: how far a concept vector moves free text (KL)."),
        Recipe("stance.train", "pipelines.recipes.stance:train", "SFT or DPO on a stance corpus."),
        Recipe("stance.weights", "pipelines.recipes.stance:weights", "Per-module weight changes."),
        Recipe(
            "stance.compare", "pipelines.recipes.stance:compare", "Seed 003's method comparison."
        ),
        Recipe("stance.patterns", "pipelines.recipes.stance:patterns", "Stance pattern rates."),
    ]
}


EVAL_SUITES = tuple(n.removeprefix("eval.") for n in RECIPES if n.startswith("eval."))


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; one line naming the known ones otherwise."""
    from introspect.errors import IntrospectError

    if name not in RECIPES:
        raise IntrospectError(f"recipe: {name!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[name]


def run_recipe(name: str, config: Config, out: str | Path, context: Context | None = None) -> dict:
    """Run a recipe; its resolved config then goes to ``config.json`` beside the output (the
    same values give the same bytes, whichever way the recipe was started). Written last, so
    input refused while the recipe starts leaves nothing behind."""
    r = recipe(name)
    out = Path(out)
    context = context or Context()
    metrics = r.run(config, out, context)
    where = out / "config.json" if r.output == "dir" else out.with_suffix(".config.json")
    record = config.model_dump(mode="json")
    if "dtype" in record:  # what the model ran in, not "default"
        record["dtype"] = metrics.get("dtype") or ran_dtype(config, context)
    write_text(where, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return metrics


def ran_dtype(config: Config, context: Context) -> str:
    """The dtype a config's model loads in: its own, else the default where it runs."""
    import torch

    from introspect import precision

    device = getattr(config, "device", None) or context.device
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return precision.dtype_name(precision.resolve(config.dtype, device))
