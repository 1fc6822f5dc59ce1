"""Experiment plans: a YAML file validated into a DAG of stages, every stage checked in full.

A plan names a model, resources, storage and a cost rate, then its stages by name::

    name: quickstart
    model: smollm2-135m
    stages:
      random:   {kind: vectors, type: random, n: 200, n_train: 100, seed: 42}
      original: {kind: data, vectors: random, variant: original, n: 600}
      run-original: {kind: train, preset: original, data: original, overrides: {lr: 1e-3}}
      b1: {kind: eval, suite: detection, models: [base, run-original], vectors: [random]}

Each stage runs a recipe (:mod:`pipelines.recipes`): ``vectors`` and ``data`` stages take the
recipe's own fields, a ``train`` stage a preset and ``overrides`` of its training fields, an
``eval`` stage its suite's ``options``, ``stance`` and ``localize`` stages a ``config``. Loading a
plan builds every stage's recipe config (with placeholders where a stage's inputs will go), so a
misspelled option, a wrong type or an out-of-range value anywhere is refused before anything
runs, in one line naming the field: ``plans/x.yaml: stages.original.overrides.lr: ...``.

A stage's inputs are the stages it names (``vectors``, ``data``, ``models``, ``after``); its
outputs live under ``runs/<plan>/<stage>/<hash>``, the hash covering its config, model and its
inputs' hashes, so an edit reruns exactly the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError

from introspect.config import Config, Precision, error_line
from introspect.errors import IntrospectError
from introspect.io import load_yaml
from introspect.models import ALIASES
from pipelines.recipes import EVAL_SUITES, recipe
from pipelines.recipes import data as data_recipe
from pipelines.recipes import norms as norms_recipe
from pipelines.recipes import vectors as vectors_recipe
from pipelines.recipes.train import Preset, overrides_config
from pipelines.sweep import SweepSettings
from pipelines.tracking import Tracking

BASE = "base"  # the untrained model in an eval's `models` list


class _Stage(Config):
    after: list[str] = Field([], description="stages that must finish first")
    model: str | None = Field(None, description="this stage's model (default: the plan's)")
    # The fields every stage hash covered when hashes were first kept; a field added since
    # enters the hash only when set away from its default, so old run directories stay valid.
    HASHED: ClassVar[tuple[str, ...]] = ()


class VectorsStage(_Stage, vectors_recipe.Config):
    kind: Literal["vectors"]
    HASHED = ("kind", "type", "n", "n_train", "seed", "layer", "model")


class NormsStage(_Stage, norms_recipe.Config):
    kind: Literal["norms"]
    HASHED = ("kind", "model")


class DataStage(_Stage, data_recipe.Config):
    kind: Literal["data"]
    vectors: str = Field(description="the vectors stage the steered rows draw from")
    norms: str | None = Field(
        None, description="relative: the norms stage to read (default: measure them here)"
    )
    HASHED = (
        "kind", "vectors", "variant", "n", "val_fraction", "seed", "magnitudes",
        "magnitude_mode", "model",
    )  # fmt: skip


class TrainStage(_Stage):
    kind: Literal["train"]
    preset: Preset = Field("original", description="seed 002's run (its settings and data)")
    data: str = Field(description="the data stage to train on")
    vectors: list[str] | None = Field(None, description="vector stages (default: the data's)")
    overrides: dict[str, Any] = Field({}, description="training fields over the preset's")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    HASHED = ("kind", "preset", "data", "vectors", "overrides", "num_workers", "model")


class SweepStage(TrainStage, SweepSettings):
    kind: Literal["sweep"]  # type: ignore[assignment]
    HASHED = (*TrainStage.HASHED, "lora_r", "lr", "search", "num_samples")


class EvalStage(_Stage):
    kind: Literal["eval"]
    suite: Literal[EVAL_SUITES] = Field(description="the evaluation suite (B1-B7 and the controls)")
    models: list[str] = Field(
        [BASE], description="'base' and/or names of train (or localize) stages"
    )
    vectors: list[str] = Field([], description="vector stages (detection: random, then concepts)")
    options: dict[str, Any] = Field({}, description="the suite's options")
    # > 0: one pool of this many model hosts evaluates the models in turn (adapters switched on
    # the loaded base); 0: each model in its own task. Not hashed: where, not what.
    hosts: int = Field(0, ge=0, description="model hosts shared by the stage's models")
    HASHED = ("kind", "suite", "models", "vectors", "options", "model")


class StanceStage(_Stage):
    kind: Literal["stance"]
    config: dict[str, Any] = Field({}, description="the stance comparison's config")
    HASHED = ("kind", "config", "model")


class LocalizeStage(_Stage):
    kind: Literal["localize"]  # Phase C: localisation training + B7 on the trained model
    config: dict[str, Any] = Field({}, description="the localisation training's config")
    vectors: str | None = Field(
        None, description="the random vectors stage to train and test on (default: built-in)"
    )
    concept_vectors: str | None = Field(
        None,
        description="the concepts vectors stage the concept question trains on (its training "
        "rows) and tests on (the rest); default: made from the shipped words",
    )
    HASHED = ("kind", "config", "model")


Stage = Annotated[
    VectorsStage
    | NormsStage
    | DataStage
    | TrainStage
    | SweepStage
    | EvalStage
    | StanceStage
    | LocalizeStage,
    Field(discriminator="kind"),
]
KINDS = ("vectors", "norms", "data", "train", "sweep", "eval", "stance", "localize")


class Resources(Precision):
    """Where a plan's trainings and model hosts run; ``dtype`` is every model's in the plan
    unless a stage's options set their own."""

    use_gpu: bool = Field(False, description="one GPU per training worker and model host")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker / task")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts after a lost worker")


class Retry(Config):
    lost: int = Field(
        2,
        ge=0,
        description="times a unit runs again after it lost a Ray worker or node (a training "
        "resumes from its last checkpoint; a pooled evaluation keeps its finished shards)",
    )
    backoff_s: float = Field(
        10.0, ge=0, description="seconds before the first such retry, doubled for each next one"
    )


class Cost(Config):
    usd_per_gpu_hour: float = Field(0.0, ge=0, description="dollars per GPU-hour")
    usd_per_cpu_hour: float = Field(0.0, ge=0, description="dollars per CPU-hour")


class Plan(Config):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the plan's name (run dir)")
    model: str = Field(description="Hugging Face id, local directory, or alias")
    description: str = ""
    runs_dir: str = Field("runs", description="where run directories go")
    storage: str | None = Field(None, description="Ray Train storage (default runs/<plan>/ray)")
    resources: Resources = Resources()
    cost: Cost = Cost()
    retry: Retry = Field(Retry(), description="what the runner does when a unit lost its worker")
    tracking: Tracking | None = Field(None, description="experiment tracking (MLflow)")
    stages: dict[str, Stage]

    def stage_model(self, name: str) -> str:
        return self.stages[name].model or self.model


def _check_model(name: str, field: str) -> None:
    """Aliases and local directories are checked here; anything else must look like a hub id."""
    if name in ALIASES or Path(name).is_dir():
        return
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return  # a Hugging Face id: resolved when the stage runs
    raise IntrospectError(
        f"{field}: {name!r} is not a model alias ({', '.join(ALIASES)}), a local directory, "
        "or a Hugging Face id (owner/name)"
    )


def inputs(stage) -> list[str]:
    """The stages this one reads from (plus its explicit ``after``)."""
    return [*stage.after, *_expected_kinds(stage)]


def _expected_kinds(stage) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if isinstance(stage, DataStage):
        out[stage.vectors] = ("vectors",)
        if stage.norms:
            out[stage.norms] = ("norms",)
    if isinstance(stage, TrainStage):  # sweeps too
        out[stage.data] = ("data",)
        out.update({v: ("vectors",) for v in stage.vectors or []})
    if isinstance(stage, LocalizeStage):
        out.update({v: ("vectors",) for v in (stage.vectors, stage.concept_vectors) if v})
    if isinstance(stage, EvalStage):
        # a Phase C (localize) stage's model is a trained model too
        out.update({m: ("train", "localize") for m in stage.models if m != BASE})
        out.update({v: ("vectors",) for v in stage.vectors})
    return out


def order(plan: Plan) -> list[str]:
    """Stage names in an order where every stage follows its inputs; a cycle is an error."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    out: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise IntrospectError(f"stages.{name}: dependency cycle {cycle}")
        state[name] = 1
        for ref in inputs(plan.stages[name]):
            visit(ref, [*path, name])
        state[name] = 2
        out.append(name)

    for name in plan.stages:
        visit(name, [])
    return out


def validate_refs(plan: Plan) -> None:
    _check_model(plan.model, "model")
    for name, stage in plan.stages.items():
        if stage.model:
            _check_model(stage.model, f"stages.{name}.model")
        for ref in inputs(stage):
            if ref not in plan.stages:
                raise IntrospectError(f"stages.{name}: refers to unknown stage {ref!r}")
        for ref, kinds in _expected_kinds(stage).items():
            if plan.stages[ref].kind not in kinds:
                raise IntrospectError(
                    f"stages.{name}: {ref!r} is a {plan.stages[ref].kind} stage, "
                    f"expected {' or '.join(kinds)}"
                )


def validate_configs(plan: Plan) -> None:
    """Build every stage's recipe config, with placeholder paths for its inputs: whatever a
    stage would refuse when it starts is refused now."""
    for name in plan.stages:
        stage_configs(plan, name, None)


# --------------------------------------------------------------------------- recipe configs
# Used twice: when a plan loads (``inputs=None``: placeholder paths stand where the inputs'
# files will be) and when a unit runs (the inputs' real directories). So a plan can never hold
# a stage that would only be refused once it starts.


def vector_file(inputs: dict[str, Path] | None, stage: str) -> str:
    """The vector file a vectors stage writes; the set is named by the file's stem."""
    return str((inputs[stage] if inputs else Path(stage)) / f"{stage}.safetensors")


def _dir(inputs: dict[str, Path] | None, stage: str, sub: str = "") -> str:
    path = inputs[stage] if inputs else Path(stage)
    return str(path / sub if sub else path)


# Plan-level fields a stage's options/config may not set: the plan fills them.
_FILLED = ("model", "adapter", "label", "vectors", "concepts", "concept_vectors")


def _own(options: dict, where: str) -> dict:
    for key in _FILLED:
        if key in options:
            raise IntrospectError(
                f"{where}.{key}: set by the plan (the stage's model, models and vectors)"
            )
    return dict(options)


def stage_configs(
    plan: Plan, name: str, inputs: dict[str, Path] | None, part: str | None = None
) -> list[tuple[str | None, str, Config]]:
    """``(part, recipe name, config)`` for each unit of stage ``name`` (one per model of an eval
    stage, part None otherwise); ``part`` given: that model's unit only."""
    stage = plan.stages[name]
    model = plan.stage_model(name)
    where = f"stages.{name}"
    if stage.kind == "vectors":
        fields = _dtype(plan, "vectors") | stage.model_dump(exclude={"kind", "after"})
        return [(None, "vectors", recipe("vectors").parse(fields | {"model": model}, where))]
    if stage.kind == "norms":
        fields = _dtype(plan, "norms") | stage.model_dump(exclude={"kind", "after"})
        return [(None, "norms", recipe("norms").parse(fields | {"model": model}, where))]
    if stage.kind == "data":
        fields = _dtype(plan, "data") | stage.model_dump(exclude={"kind", "after"})
        fields["model"] = model
        fields["vectors"] = vector_file(inputs, stage.vectors)
        if stage.norms:
            _check_norms(plan, name)
            fields["norms"] = _dir(inputs, stage.norms, "norms.json")
        return [(None, "data", recipe("data").parse(fields, where))]
    if stage.kind in ("train", "sweep"):
        return [(None, stage.kind, _train_config(plan, name, inputs))]
    if stage.kind == "eval":
        return [
            (m, f"eval.{stage.suite}", _eval_config(plan, name, m, inputs))
            for m in stage.models
            if part is None or m == part
        ]
    kind = "stance.compare" if stage.kind == "stance" else "localize"
    options = _dtype(plan, kind) | _own(stage.config, f"{where}.config") | {"model": model}
    if stage.kind == "localize" and stage.vectors:
        options["vectors"] = vector_file(inputs, stage.vectors)
    if stage.kind == "localize" and stage.concept_vectors:
        options["concept_vectors"] = vector_file(inputs, stage.concept_vectors)
    return [(None, kind, recipe(kind).parse(options, f"{where}.config"))]


def eval_dtype(plan: Plan, name: str) -> str | None:
    """The dtype an eval stage's models load in: its own option, else the plan's."""
    return plan.stages[name].options.get("dtype", plan.resources.dtype)


def _dtype(plan: Plan, kind: str) -> dict:
    """The plan's ``resources.dtype`` for a recipe that loads a model; a stage's own wins."""
    if plan.resources.dtype is None or "dtype" not in recipe(kind).config.model_fields:
        return {}
    return {"dtype": plan.resources.dtype}


def _check_norms(plan: Plan, name: str) -> None:
    """A data stage reads norms measured on its own model and texts, for relative magnitudes."""
    stage, where = plan.stages[name], f"stages.{name}.norms"
    norms = plan.stages[stage.norms]
    if stage.magnitude_mode != "relative":
        raise IntrospectError(f"{where}: only relative magnitudes read norms; drop it")
    if plan.stage_model(stage.norms) != plan.stage_model(name):
        raise IntrospectError(
            f"{where}: {stage.norms!r} measures {plan.stage_model(stage.norms)!r}, this stage "
            f"steers {plan.stage_model(name)!r}"
        )
    if norms.prompts != stage.prompts:
        raise IntrospectError(f"{where}: {stage.norms!r} measures other texts (prompts differ)")


def _train_config(plan: Plan, name: str, inputs: dict[str, Path] | None) -> Config:
    stage = plan.stages[name]
    where = f"stages.{name}"
    settings = overrides_config(stage.preset, stage.overrides, f"{where}.overrides")
    data = plan.stages[stage.data]
    if settings.data_variant != data.variant:
        raise IntrospectError(
            f"{where}.data: preset {stage.preset!r} expects {settings.data_variant!r} data, "
            f"{stage.data!r} is {data.variant!r}"
        )
    fields = {
        "model": plan.stage_model(name),
        "data": _dir(inputs, stage.data),
        # Absolute: a Tune trial runs in a directory of its own.
        "vectors": [
            str(Path(vector_file(inputs, v)).resolve()) if inputs else vector_file(None, v)
            for v in (stage.vectors or [data.vectors])
        ],
        "preset": stage.preset,
    }
    if plan.resources.dtype:
        fields["dtype"] = plan.resources.dtype
    if stage.kind == "train":
        return recipe("train").parse({**fields, **stage.overrides}, f"{where}.overrides")
    sweep = stage.model_dump(include=set(recipe("sweep").config.model_fields))
    return recipe("sweep").parse({**sweep, **fields, "overrides": stage.overrides}, where)


def _eval_config(plan: Plan, name: str, model_ref: str, inputs: dict[str, Path] | None):
    stage = plan.stages[name]
    where = f"stages.{name}"
    cls = recipe(f"eval.{stage.suite}").config
    config = _dtype(plan, f"eval.{stage.suite}") | _own(stage.options, f"{where}.options")
    config["model"] = plan.stage_model(name)
    if model_ref != BASE:
        config["adapter"] = _dir(inputs, model_ref, "run")
    config["label"] = model_ref  # "base" or the training stage, not an adapter path
    files = [vector_file(inputs, v) for v in stage.vectors]
    if stage.suite == "detection":
        if not files:
            raise IntrospectError(f"{where}.vectors: detection needs a random vector stage")
        config["vectors"] = files[0]
        if len(files) > 1:
            config["concepts"] = files[1]
    elif files:
        if "vectors" not in cls.model_fields:
            raise IntrospectError(f"{where}.vectors: suite {stage.suite!r} takes no vectors")
        config["vectors"] = files[0]
        if len(files) > 1 and "concept_vectors" in cls.model_fields:  # B7's concept question
            config["concept_vectors"] = files[1]
    return recipe(f"eval.{stage.suite}").parse(config, f"{where}.options")


def _plan_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = list(err["loc"])
    # A discriminated union puts the kind in the path ("stages.x.train.preset"): drop it.
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in KINDS:
        loc.pop(2)
    if err["type"] == "union_tag_invalid":
        return (
            f"{source}: {'.'.join(map(str, loc))}: unknown kind {err['input'].get('kind')!r} "
            f"(known: {', '.join(KINDS)})"
        )
    return f"{source}: {error_line({**err, 'loc': tuple(loc)})}"


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """A plan from already-parsed YAML; one line naming the field on any error."""
    if not isinstance(data, dict):
        raise IntrospectError(f"{source}: a plan is a YAML mapping (name, model, stages, ...)")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise IntrospectError(_plan_line(e, source)) from None
    try:
        validate_refs(plan)
        order(plan)
        validate_configs(plan)
    except IntrospectError as e:
        raise IntrospectError(f"{source}: {e}") from None
    return plan


def load_plan(path: str | Path) -> Plan:
    """Read (strict YAML: ``1e-3`` is a float, a repeated key is an error) and validate a plan."""
    return parse_plan(load_yaml(path, "plan"), str(path))


def _hashed(stage) -> dict:
    """The stage's fields as its hash sees them (see ``_Stage.HASHED``)."""
    dump = stage.model_dump(exclude={"after", "hosts"})
    fields = type(stage).model_fields
    return {
        k: v
        for k, v in dump.items()
        if k in stage.HASHED or v != fields[k].get_default(call_default_factory=True)
    }


def _hashed_dtype(plan: Plan, kind: str) -> dict:
    """The dtype the stage's models load in (the plan's, or the default of where it runs) when
    it is not the default that hashes were first made under (bf16 on a GPU, fp32 on a CPU): such
    a stage keeps the hash it always had, and on a CPU whose default became bf16 a run made
    under the old fp32 default is not taken for the new one. A training's named dtype is in its
    (hashed) ``resources`` already."""
    from introspect.precision import default_dtype, dtype_name

    gpu = plan.resources.use_gpu
    named = plan.resources.dtype
    dtype = named or dtype_name(default_dtype("cuda" if gpu else "cpu"))
    if dtype == ("bfloat16" if gpu else "float32") or (kind in ("train", "sweep") and named):
        return {}
    return {"dtype": dtype}


def stage_hashes(plan: Plan) -> dict[str, str]:
    """A short hash per stage over its config, its model and its inputs' hashes."""
    out: dict[str, str] = {}
    for name in order(plan):
        stage = plan.stages[name]
        payload = {
            "stage": _hashed(stage),
            "model": plan.stage_model(name),
            "resources": plan.resources.model_dump() if stage.kind in ("train", "sweep") else None,
            **_hashed_dtype(plan, stage.kind),
            "inputs": {ref: out[ref] for ref in inputs(stage)},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        out[name] = hashlib.sha256(blob).hexdigest()[:12]
    return out
