"""The import graph, read from the source with `ast` (nothing is imported).

Every import statement in a file counts, at module level or inside a function. Imports flow one
way, `cluster → pipelines → actors → introspect` (docs: DESIGN.md "Layout and layering"): no
cycles among the modules of those packages, no import of a package further left, and no Ray in
`introspect/`. An edge goes to the module named (`from x import y` to `x.y` when that is a
module), not to the packages above it. The synthetic trees below show each check can fail.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("introspect", "actors", "pipelines", "cluster")  # each may import only its left


def graph(root: Path) -> dict[str, dict[str, tuple[Path, int]]]:
    """module -> {imported name (a module of the tree where one matches): (file, line)}."""
    files = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    known = set(files)

    def resolve(name: str) -> str:  # the longest prefix that is a module of the tree
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in known:
                return ".".join(parts[:i])
        return name

    edges: dict[str, dict[str, tuple[Path, int]]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = edges.setdefault(mod, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [resolve(f"{base}.{a.name}" if base else a.name) for a in node.names]
            else:
                continue
            for name in names:
                if name != mod:
                    out.setdefault(name, (path, node.lineno))
    return edges


def cycles(edges) -> list[list[str]]:
    """One shortest cycle through each module that lies on a cycle (duplicates dropped)."""
    found = []
    for start in sorted(edges):
        paths, queue = {start: [start]}, [start]
        while queue:
            mod = queue.pop(0)
            nxt = sorted(t for t in edges.get(mod, ()) if t in edges)
            if start in nxt:
                cycle = paths[mod] + [start]
                if set(cycle) not in [set(c) for c in found]:
                    found.append(cycle)
                break
            for t in nxt:
                if t not in paths:
                    paths[t] = paths[mod] + [t]
                    queue.append(t)
    return found


def layering(edges) -> list[str]:
    """Each import of a package further left in `cluster → pipelines → actors → introspect`."""
    rank = lambda m: LAYERS.index(m.split(".")[0]) if m.split(".")[0] in LAYERS else -1  # noqa: E731
    return [f"{where[0]}:{where[1]}: {mod} imports {to}" for mod, out in sorted(edges.items())
            for to, where in sorted(out.items()) if rank(to) > rank(mod)]


def ray_in_introspect(edges) -> list[str]:
    return [f"{where[0]}:{where[1]}: {mod} imports {to}" for mod, out in sorted(edges.items())
            for to, where in sorted(out.items())
            if mod.split(".")[0] == "introspect" and to.split(".")[0] == "ray"]


def show(cycle: list[str], edges) -> str:
    steps = [f"{a} -> {b} ({edges[a][b][0]}:{edges[a][b][1]})" for a, b in pairwise(cycle)]
    return "\n  ".join(["cycle:", *steps])


# --------------------------------------------------------------------------- the repo


@pytest.fixture(scope="module")
def repo_edges():
    return graph(REPO)


def test_the_graph_sees_the_repo(repo_edges):
    assert "introspect.models" in repo_edges and "cluster.cli" in repo_edges
    assert "introspect.errors" in repo_edges["pipelines.train_job"]


def test_no_import_cycles(repo_edges):
    found = cycles(repo_edges)
    assert not found, "\n".join(show(c, repo_edges) for c in found)


def test_imports_go_cluster_pipelines_actors_introspect(repo_edges):
    wrong = layering(repo_edges)
    assert not wrong, "\n".join(wrong)


def test_introspect_imports_no_ray(repo_edges):
    wrong = ray_in_introspect(repo_edges)
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- the checker


def tree(root: Path, files: dict[str, str]) -> dict:
    for name in LAYERS:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    return graph(root)


CLEAN = {
    "introspect/a.py": "import os\nfrom introspect import b\n",
    "introspect/b.py": "from .c import X\n",
    "introspect/c.py": "X = 1\n",
    "actors/h.py": "import ray\nfrom introspect.a import b\n",
    "pipelines/p.py": "from actors import h\nfrom introspect import c\n",
    "cluster/cli.py": "from pipelines.p import h\n\ndef main():\n    from . import cli\n",
}


def test_a_clean_tree_passes(tmp_path):
    edges = tree(tmp_path, CLEAN)
    assert edges["introspect.a"] == {"os": (tmp_path / "introspect/a.py", 1),
                                     "introspect.b": (tmp_path / "introspect/a.py", 2)}
    assert "introspect.c" in edges["introspect.b"]  # relative, to a module
    assert "introspect.c" in edges["pipelines.p"]  # `from package import module`
    assert not cycles(edges) and not layering(edges) and not ray_in_introspect(edges)


def test_cycles_are_caught_with_their_path(tmp_path):
    edges = tree(tmp_path, {**CLEAN, "introspect/c.py": "def f():\n    from . import a\n"})
    assert cycles(edges) == [["introspect.a", "introspect.b", "introspect.c", "introspect.a"]]
    two = {"introspect/x.py": "import introspect.y\n",
           "introspect/y.py": "def f():\n    from introspect.x import g\n"}
    edges = tree(tmp_path / "two", two)
    assert cycles(edges) == [["introspect.x", "introspect.y", "introspect.x"]]
    assert "introspect/y.py:2" in show(cycles(edges)[0], edges)


def test_an_import_against_the_layers_is_caught(tmp_path):
    bad = {**CLEAN, "actors/h.py": "from introspect import a\n\ndef f():\n    import pipelines.p\n"}
    assert layering(tree(tmp_path, bad)) == [
        f"{tmp_path / 'actors/h.py'}:4: actors.h imports pipelines.p"
    ]


def test_ray_inside_a_function_of_introspect_is_caught(tmp_path):
    bad = {**CLEAN, "introspect/c.py": "X = 1\n\ndef f():\n    from ray.util import state\n"}
    assert ray_in_introspect(tree(tmp_path, bad)) == [
        f"{tmp_path / 'introspect/c.py'}:4: introspect.c imports ray.util.state"
    ]
