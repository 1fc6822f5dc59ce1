"""Experiment plans: a YAML file validated into a DAG of stages.

A plan names a model, resources, storage and a cost rate, then its stages by name::

    name: quickstart
    model: smollm2-135m
    stages:
      random:   {kind: vectors, type: random, n: 200, n_train: 100, seed: 42}
      original: {kind: data, vectors: random, variant: original, n: 600}
      run-original: {kind: train, preset: original, data: original}
      b1: {kind: eval, suite: detection, models: [base, run-original], vectors: random}

A stage's inputs are the stages it names (``vectors``, ``data``, ``models``, ``after``); a stage's
outputs live under ``runs/<plan>/<stage>/<hash>`` where the hash covers its own config and its
inputs' hashes, so an edit reruns exactly the stages downstream of it. Every error names the
field, e.g. ``stages.run-original.preset: 'orignal' is not one of ...``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from introspect.errors import IntrospectError
from introspect.models import ALIASES
from introspect.train import PRESETS, TrainConfig

EVAL_SUITES = (
    "detection",
    "behavioral",
    "identity",
    "self-prediction",
    "calibration",
    "concepts",
    "localization",
)
BASE = "base"  # the untrained model in an eval's `models` list


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stage(_Strict):
    after: list[str] = []  # extra ordering: stages that must finish first
    model: str | None = None  # default: the plan's model


class VectorsStage(_Stage):
    kind: Literal["vectors"]
    type: Literal["random", "concepts"] = "random"
    n: int = Field(200, ge=1)
    n_train: int | None = None  # random: rows < n_train are for training (default n // 2)
    seed: int = 0
    layer: int | None = None  # concepts: extraction layer (default 2/3 depth)


class DataStage(_Stage):
    kind: Literal["data"]
    vectors: str
    variant: str = "original"
    n: int = Field(1000, ge=2)
    val_fraction: float = 0.1
    seed: int = 0
    magnitudes: list[float] = [0.05, 0.1, 0.2, 0.3]
    magnitude_mode: Literal["absolute", "relative"] = "relative"


class TrainStage(_Stage):
    kind: Literal["train"]
    preset: str = "original"
    data: str
    vectors: list[str] | None = None  # default: the data stage's vectors
    overrides: dict[str, Any] = {}
    num_workers: int = Field(1, ge=1)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"{v!r} is not one of {', '.join(PRESETS)}")
        return v

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, v: dict) -> dict:
        known = set(TrainConfig.__dataclass_fields__)
        for key in v:
            if key not in known:
                raise ValueError(f"{key!r} is not a training option")
        return v


class SweepStage(TrainStage):
    kind: Literal["sweep"]  # type: ignore[assignment]
    lora_r: list[int] = [4, 16]
    lr: list[float] = [1e-4, 5e-4]
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 4


class EvalStage(_Stage):
    kind: Literal["eval"]
    suite: str
    models: list[str] = [BASE]  # "base" and/or names of train stages
    vectors: list[str] = []  # vector stages the suite uses (detection: random, then concepts)
    options: dict[str, Any] = {}  # passed to the suite (n_per_tier, magnitudes, ...)
    # > 0: one pool of this many model hosts evaluates the models in turn (adapters switched on
    # the loaded base); 0: each model in its own task. Strict: `hosts: true` is not 1 host.
    hosts: int = Field(0, ge=0, strict=True)

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, v: str) -> str:
        if v not in EVAL_SUITES:
            raise ValueError(f"{v!r} is not one of {', '.join(EVAL_SUITES)}")
        return v


class StanceStage(_Stage):
    kind: Literal["stance"]
    config: dict[str, Any] = {}


class LocalizeStage(_Stage):
    kind: Literal["localize"]  # Phase C: localisation training + B7 on the trained model
    config: dict[str, Any] = {}


Stage = Annotated[
    VectorsStage | DataStage | TrainStage | SweepStage | EvalStage | StanceStage | LocalizeStage,
    Field(discriminator="kind"),
]


class Resources(_Strict):
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    dtype: str | None = None
    max_failures: int = 2


class Cost(_Strict):
    usd_per_gpu_hour: float = Field(0.0, ge=0)
    usd_per_cpu_hour: float = Field(0.0, ge=0)


class Plan(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    description: str = ""
    runs_dir: str = "runs"
    storage: str | None = None  # Ray Train storage (local dir or s3://); default runs/<plan>/ray
    resources: Resources = Resources()
    cost: Cost = Cost()
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
    refs: list[str] = list(stage.after)
    if isinstance(stage, DataStage):
        refs.append(stage.vectors)
    if isinstance(stage, TrainStage):  # sweeps too
        refs.append(stage.data)
        refs.extend(stage.vectors or [])
    if isinstance(stage, EvalStage):
        refs.extend(m for m in stage.models if m != BASE)
        refs.extend(stage.vectors)
    return refs


def _expected_kinds(stage) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if isinstance(stage, DataStage):
        out[stage.vectors] = ("vectors",)
    if isinstance(stage, TrainStage):
        out[stage.data] = ("data",)
        out.update({v: ("vectors",) for v in stage.vectors or []})
    if isinstance(stage, EvalStage):
        out.update({m: ("train",) for m in stage.models if m != BASE})
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


def _pydantic_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if x not in ("function-after",))
    # Discriminated unions put the kind in the path ("stages.x.train.preset"): drop it.
    parts = loc.split(".")
    if (
        len(parts) > 2
        and parts[0] == "stages"
        and parts[2] in {"vectors", "data", "train", "sweep", "eval", "stance", "localize"}
    ):
        parts.pop(2)
    loc = ".".join(parts)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown kind {err['input'].get('kind')!r} (known: {err['ctx']['expected_tags']})"
    return f"{loc}: {msg}"


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """A plan from already-parsed YAML; one line naming the field on any error."""
    if not isinstance(data, dict):
        raise IntrospectError(f"{source}: a plan is a YAML mapping (name, model, stages, ...)")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise IntrospectError(f"{source}: {_pydantic_line(e)}") from None
    try:
        validate_refs(plan)
        order(plan)
    except IntrospectError as e:
        raise IntrospectError(f"{source}: {e}") from None
    return plan


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise IntrospectError(f"plan: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise IntrospectError(
            f"plan: {path} is not valid YAML ({str(e).splitlines()[0]})"
        ) from None
    return parse_plan(data, str(path))


def stage_hashes(plan: Plan) -> dict[str, str]:
    """A short hash per stage over its config, its model and its inputs' hashes."""
    out: dict[str, str] = {}
    for name in order(plan):
        stage = plan.stages[name]
        payload = {
            # `hosts` says where an eval runs, not what it computes: changing it reruns nothing.
            "stage": stage.model_dump(exclude={"after", "hosts"}),
            "model": plan.stage_model(name),
            "resources": plan.resources.model_dump() if stage.kind in ("train", "sweep") else None,
            "inputs": {ref: out[ref] for ref in inputs(stage)},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        out[name] = hashlib.sha256(blob).hexdigest()[:12]
    return out
