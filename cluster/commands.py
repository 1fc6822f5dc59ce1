"""Commands generated from recipe configs: every field a flag, with its help text and default.

A thin generator over click (the library typer is built on): a recipe's pydantic config gives
the options, ``--config FILE.yaml`` supplies any of them from a file and flags override it, and
the values go through the same :func:`introspect.config.parse` as a plan's. Flags arrive as text
and are converted by the field's type (a number, a comma-separated list, ...) so that a wrong
value is refused by the config, in the one-line form, not by a parser with its own rules.

Command groups build their commands only when one is used, so ``introspect --help`` does not
import the science (torch, transformers).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import click
from pydantic.fields import FieldInfo

from introspect.errors import IntrospectError

# --------------------------------------------------------------------------- field types


def _base(annotation: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` → X."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _base(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(annotation: Any) -> str:
    base = _base(annotation)
    origin = typing.get_origin(base)
    if base is bool:
        return "bool"
    if origin is list:
        return "list"
    if origin is dict or base is dict:
        return "dict"
    return "scalar"


def _scalar(text: str, annotation: Any) -> Any:
    """Text as the field's type where it reads as one; as text otherwise, so that the config
    refuses it naming the field."""
    base = _base(annotation)
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        return text
    if typing.get_origin(base) is Literal and all(
        isinstance(a, int) for a in typing.get_args(base)
    ):
        return _scalar(text, int)
    return text


def _list(texts: tuple[str, ...], annotation: Any) -> list:
    (item,) = typing.get_args(_base(annotation)) or (str,)
    parts = [p.strip() for t in texts for p in t.split(",") if p.strip()]
    return [_scalar(p, item) for p in parts]


def _value(raw: Any, annotation: Any) -> Any:
    """A flag's text (a tuple of texts for a list) as the field's type."""
    kind = _kind(annotation)
    if kind == "list":
        return _list(raw if isinstance(raw, tuple) else (raw,), annotation)
    return raw if kind == "bool" else _scalar(raw, annotation)


def key_values(items: tuple[str, ...] | list[str], annotations: dict[str, Any] | None) -> dict:
    """``key=value`` pairs (``--set``): values typed by ``annotations`` where a key has one,
    else read as YAML scalars (numbers, true/false, null, lists)."""
    from introspect.io import yaml_scalar

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise IntrospectError(f"set: {item!r} must look like key=value")
        key = key.strip().replace("-", "_")
        hint = (annotations or {}).get(key)
        typed = hint is not None and _kind(hint) in ("list", "scalar")
        out[key] = _value(value, hint) if typed else yaml_scalar(value)
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _help(f: FieldInfo) -> str:
    text = (f.description or "").rstrip(".")
    if f.is_required():
        return f"{text} [required]"
    return f"{text} [default: {_show(f.get_default(call_default_factory=True))}]"


def _metavar(annotation: Any) -> str:
    base = _base(annotation)
    if typing.get_origin(base) is list:
        return _metavar(typing.get_args(base)[0]) + ",..."
    if typing.get_origin(base) is Literal:
        return "[" + "|".join(map(str, typing.get_args(base))) + "]"
    return {int: "INT", float: "FLOAT"}.get(base, "TEXT")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------- commands


def recipe_command(
    cli_name: str,
    recipe_name: str,
    *,
    fixed: dict[str, Any] | None = None,
    hide: tuple[str, ...] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    arguments: tuple[str, ...] = (),
    engine: tuple[click.Option, ...] = (),
    prepare: Callable[[dict, Any], Any] | None = None,
) -> click.Command:
    """A command for ``recipe_name``: one option per config field (``fixed`` fields set and not
    shown, ``hide`` left out), ``arguments`` positional, ``engine`` extra options handed to
    ``prepare(engine_values, context)`` (connecting to Ray, a host pool)."""
    from pipelines.recipes import recipe

    r = recipe(recipe_name)
    cls = r.config
    fixed = fixed or {}
    aliases = {"max_steps": ("--steps",), **(aliases or {})}  # every command's old spelling
    hints = {n: f.annotation for n, f in cls.model_fields.items()}
    shown = [n for n in cls.model_fields if n not in fixed and n not in hide]
    dict_fields = [n for n in shown if _kind(hints[n]) == "dict"]
    set_target = dict_fields[0] if len(dict_fields) == 1 else None

    params: list[click.Parameter] = [click.Argument([a]) for a in arguments]
    params.append(
        click.Option(
            ["--out"],
            required=True,
            type=click.Path(path_type=Path),
            help="output file" if r.output == "file" else "output directory",
        )
    )
    params.append(
        click.Option(
            ["--config", "config_file"],
            type=click.Path(path_type=Path),
            help="YAML file with any of these fields; flags override it",
        )
    )
    for name in shown:
        if name in arguments or name in dict_fields:
            continue
        f, kind = cls.model_fields[name], _kind(hints[name])
        names = [_flag(name), *aliases.get(name, ())]
        if kind == "bool":
            decls = [f"{n}/--no-{n[2:]}" for n in names]
            params.append(
                click.Option([*decls, name], default=None, show_default=False, help=_help(f))
            )
        else:
            params.append(
                click.Option(
                    [*names, name],
                    multiple=kind == "list",
                    default=None,
                    show_default=False,
                    metavar=_metavar(hints[name]),
                    help=_help(f),
                )
            )
    set_help = f"{set_target}: key=value (repeatable)" if set_target else "any field: key=value"
    params.append(click.Option(["--set", "set_"], multiple=True, help=set_help))
    params.extend(engine)
    engine_names = {p.name for p in engine}

    def callback(out: Path, config_file: Path | None, set_: tuple[str, ...], **given) -> None:
        from introspect.io import load_yaml
        from pipelines.recipes import Context, run_recipe

        values: dict[str, Any] = {}
        if config_file is not None:
            values = load_yaml(config_file, "config") or {}
            if not isinstance(values, dict):
                raise IntrospectError(f"config: {config_file} must hold a mapping of fields")
        engine_values = {k: given.pop(k) for k in list(given) if k in engine_names}
        values |= {n: _value(v, hints[n]) for n, v in given.items() if v not in (None, ())}
        if set_ and set_target:  # e.g. a sweep's training overrides
            values[set_target] = {**values.get(set_target, {}), **key_values(set_, None)}
        elif set_:
            values.update(key_values(set_, hints))
        values.update(fixed)
        config = r.parse(values)
        around = prepare(engine_values, config) if prepare else nullcontext()
        with _progress_bar() as progress, around as mapper:
            metrics = run_recipe(
                recipe_name, config, out, Context(progress=progress, mapper=mapper)
            )
        click.echo(r.summary(metrics, out), err=True)

    return click.Command(cli_name, callback=callback, params=params, help=r.help)


@contextmanager
def _progress_bar():
    """A rich bar on stderr, started when a recipe first reports progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("", total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


class LazyGroup(click.Group):
    """A group whose commands are built when first asked for; its help lists them from their
    one-line descriptions alone."""

    def __init__(self, *args, lazy: dict[str, tuple[str, Callable[[], click.Command]]], **kw):
        super().__init__(*args, **kw)
        self.lazy = lazy  # name -> (short help, builder)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self.lazy[name][1](), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, self.lazy[name][0]))
            else:
                cmd = super().get_command(ctx, name)
                rows.append((name, cmd.get_short_help_str(80)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
