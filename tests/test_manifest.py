"""Manifests: a finished directory's files as they were, and the first difference named."""

from introspect.manifest import MANIFEST, damage, write_manifest


def finished(d):
    (d / "sub").mkdir(parents=True)
    (d / "metrics.json").write_text('{"accuracy": 0.75}')
    (d / "sub" / "w.bin").write_bytes(bytes(range(256)) * 4)
    write_manifest(d)
    return d


def test_an_untouched_directory_matches(tmp_path):
    d = finished(tmp_path / "d")
    assert damage(d) is None
    assert damage(tmp_path) is None  # no manifest: trusted, as before manifests existed


def test_truncation_edits_and_loss_are_each_named(tmp_path):
    d = finished(tmp_path / "cut")
    (d / "sub" / "w.bin").write_bytes(bytes(100))
    assert damage(d) == "sub/w.bin has 100 bytes, 1024 when it was written"
    d = finished(tmp_path / "edited")
    (d / "metrics.json").write_text('{"accuracy": 0.95}')  # the same size
    assert damage(d) == "metrics.json changed since it was written (SHA-256 differs)"
    d = finished(tmp_path / "lost")
    (d / "metrics.json").unlink()
    assert damage(d) == "metrics.json is missing"
    d = finished(tmp_path / "garbled")
    (d / MANIFEST).write_text("{")
    assert damage(d) == f"{MANIFEST} cannot be read"


def test_large_files_are_checked_by_size(tmp_path, monkeypatch):
    import introspect.manifest as m

    monkeypatch.setattr(m, "HASHED_BYTES", 10)
    d = finished(tmp_path / "d")
    (d / "sub" / "w.bin").write_bytes(bytes(1024))  # same size, other bytes: not hashed
    assert damage(d) is None
    (d / "sub" / "w.bin").write_bytes(bytes(1000))
    assert damage(d) == "sub/w.bin has 1000 bytes, 1024 when it was written"
