"""The base of every recipe's config, and the one way a config is built from plain data.

A config is a pydantic model: unknown keys are refused, types are strict (``"5"`` is not an int,
``"true"`` is not a bool, ``1.5`` is not an int; an int is a fine float), and each field has its
constraints and help text on it. The CLI, plans and Python all build configs with :func:`parse`,
so a field has one definition, one default and one validation whichever way it is reached, and
every error is one line naming the field path: ``stages.b1.options.n_per_tier: ...``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from introspect.errors import IntrospectError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Unknown keys refused, strict types, validated on assignment too.

    ``FULL``: the values of a real run. ``full: true`` puts them in place of the quick defaults;
    anything the config sets explicitly still wins."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
    FULL: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _full_sizes(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.FULL and data.get("full") is True:
            return {**cls.FULL, **data}
        return data


def error_line(e: ValidationError | dict, prefix: str = "") -> str:
    """The first error of ``e`` (or one error dict of it) as ``prefix.field.path: message``."""
    err = e if isinstance(e, dict) else e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    path = ".".join([p for p in (prefix, *loc) if p]) or prefix or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required"
    elif (
        "input" in err
        and err["type"] not in ("literal_error",)
        and not isinstance(err["input"], dict)
    ):
        msg = f"{err['input']!r}: {msg}"
    return f"{path}: {msg}"


def parse(cls: type[C], data: Any, where: str = "") -> C:
    """``cls`` from a mapping (or a ``cls`` as is); :class:`IntrospectError` naming the field."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise IntrospectError(f"{where or 'config'}: expected a mapping of options, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise IntrospectError(error_line(e, where)) from None


class SystemPrompt(Config):
    """The system turn every conversation starts with: one definition for data and evals."""

    system_prompt: str | None = Field(
        None,
        description="system turn before every conversation (default: none, so the chat "
        "template's own; the reference sends 'You are a helpful assistant.')",
    )


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` after the system turn, unless there is none or they bring their own."""
    if system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


DEFAULT_MODEL = "smollm2-135m"


DType = Literal["float32", "bfloat16", "float16"]


class Precision(Config):
    """The dtype a model runs in: one definition for every recipe, eval and plan that loads one
    (resolved by ``introspect.precision.default_dtype`` when not given)."""

    dtype: DType | None = Field(
        None,
        description="weights' dtype (default: bfloat16 on a GPU, and on a CPU with AMX, where "
        "the benchmark showed results hold and bf16 runs faster; float32 elsewhere). Training "
        "keeps the weights it updates in float32",
    )


class ModelChoice(Precision):
    """The model a recipe runs: one definition of the field for every recipe that loads one."""

    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face id, local directory, or alias (smollm2-135m, tiny-random)",
    )
