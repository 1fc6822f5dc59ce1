"""Files: the one atomic write, JSON/JSONL readers and writers, Markdown tables, strict YAML.

Every output of the lab goes through :func:`atomic_write` (temp file in the same directory, then
rename), so a killed run never leaves half a file where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from introspect.errors import IntrospectError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp_path)`` then rename onto ``path``; the temp file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` into ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(path: str | os.PathLike, field: str) -> Path:
    """Create directory ``path`` if needed and prove a file can be written into it; a
    read-only, full or foreign directory is one line naming ``field``, before work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(bytes(4096))  # a page: a full disk refuses it
        probe.unlink()
    except OSError as e:
        raise IntrospectError(f"{field}: cannot write {path}: {e.strerror or e}") from None
    return path


def read_json(path: str | os.PathLike) -> Any | None:
    """A JSON file's content, or None when there is no such file (a result not written yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON, atomically (non-JSON values such as paths as strings)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped); one clear line if a row is not JSON."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise IntrospectError(f"{path}:{i}: not a JSON row ({e.msg})") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """``rows`` as JSONL, atomically."""
    return write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def cell(value: Any, digits: int = 4) -> str:
    """One table cell: floats to ``digits`` significant figures, missing values as ``–``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows, columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub Markdown table of a DataFrame, or of dict rows with the given ``columns``.

    DataFrame cells are formatted by :func:`cell` and numeric columns right-aligned; dict rows
    are shown as given (callers format their own numbers)."""
    if columns is None:  # a DataFrame
        import pandas as pd

        columns = list(rows.columns)
        align = ["---:" if pd.api.types.is_numeric_dtype(rows[c]) else "---" for c in columns]
        body = [[cell(v, digits) for v in r] for r in rows.itertuples(index=False)]
    else:
        align = ["---"] * len(columns)
        body = [[str(r.get(c, "")) for c in columns] for r in rows]
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- strict YAML


class _StrictLoader(yaml.SafeLoader):
    """YAML as a person means it: ``1e-3`` is a float (YAML 1.2), not the text "1e-3"."""


# PyYAML implements YAML 1.1, whose float pattern needs a dot: `1e-3` would be the string
# "1e-3". This is YAML 1.2's core-schema float (plus 1.1's forms, which it keeps).
_FLOAT = r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
|[-+]?\.(?:inf|Inf|INF)
|\.(?:nan|NaN|NAN))$"""
_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(_FLOAT, re.X),
    list("-+0123456789."),
)


def _duplicate_key(node: yaml.Node, path: tuple = ()) -> str | None:
    """The path of the first key given twice in one mapping (PyYAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: keys written beside it override on purpose
            key = key_node.value
            if key in seen:
                return ".".join(map(str, (*path, key))) + (
                    f": given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
            found = _duplicate_key(value, (*path, key))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, (*path, i))
            if found:
                return found
    return None


def yaml_scalar(text: str) -> Any:
    """One value as YAML reads it strictly (``1e-3`` a float, ``true`` a bool, ``[1, 2]`` a
    list); plain text stays text."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def load_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """A YAML file read strictly (see :class:`_StrictLoader`); one clear line on any error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise IntrospectError(f"{what}: cannot read {path} ({e.strerror})") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=_StrictLoader))
        if duplicate:
            raise IntrospectError(f"{path}: {duplicate}")
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise IntrospectError(f"{path}: not valid YAML: {problem}{where}") from None
