"""constraints.txt (written by `make lock`): exact pins, torch and this project left out, and
every dependency pyproject.toml names (the dev extra included) pinned in it."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    rows = [x for x in lines if x.strip() and not x.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", x) for x in rows), rows
    return {canonical(x.split("==")[0]): x.split("==")[1] for x in rows}


def test_constraints_pin_every_declared_dependency_but_torch():
    locked = pins()
    assert "torch" not in locked and "introspect" not in locked
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {canonical(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in declared}
    missing = sorted(names - set(locked) - {"torch"})
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"
