"""What a finished directory held when it was finished, so later damage is told from results.

A stage's outputs and a training checkpoint are written under a temporary name and renamed
when complete (:func:`introspect.checkpoints.replace_dir`), so a crash never leaves half a
directory under the final name. What that cannot catch is damage afterwards: a copy to or from
storage cut short, a full disk on a later rewrite, a file edited by hand. ``MANIFEST.json``
lists every file's size and, below ``HASHED_BYTES``, its SHA-256; :func:`damage` names the
first file that no longer matches. Directories written before manifests existed have none and
are trusted as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from introspect.io import sha256_file, write_json

MANIFEST = "MANIFEST.json"
# Larger files (a full model's weights) are checked by size only: hashing 64 GB of a 32B export
# on every rerun would cost a minute per stage.
HASHED_BYTES = 256 * 2**20


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    return {"bytes": size, "sha256": sha256_file(path) if size <= HASHED_BYTES else None}


def write_manifest(directory: Path) -> dict:
    """List every file under ``directory`` in its manifest."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): _entry(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json(directory / MANIFEST, {"files": files})
    return files


def damage(directory: Path) -> str | None:
    """The first way ``directory`` differs from its manifest, in words; None when it matches
    (or has no manifest)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} cannot be read"
    for name, was in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != was["bytes"]:
            return f"{name} has {size} bytes, {was['bytes']} when it was written"
        if was.get("sha256") and sha256_file(f) != was["sha256"]:
            return f"{name} changed since it was written (SHA-256 differs)"
    return None
