"""Nothing a user typed before the CLI was generated from configs breaks: every command and
every flag of the hand-written CLI (tests/data/cli_flags_before.json, read off commit ef50a29)
still exists; and every config field is a flag with its help text."""

import json
from pathlib import Path

import click
import pytest

from cluster.cli import app

BEFORE = json.loads((Path(__file__).parent / "data" / "cli_flags_before.json").read_text())


def command(path: str) -> click.Command:
    ctx, cmd = click.Context(app), app
    for part in path.split():
        cmd = cmd.get_command(ctx, part)
        assert cmd is not None, path
    return cmd


def flags(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


@pytest.mark.parametrize("path", sorted(BEFORE))
def test_every_old_flag_still_exists(path):
    missing = set(BEFORE[path]["flags"]) - flags(command(path))
    assert not missing, f"{path}: {sorted(missing)}"


@pytest.mark.parametrize("path", [p for p in sorted(BEFORE) if p.split()[0] not in
                                  ("run", "report", "submit", "status")])  # fmt: skip
def test_help_lists_every_field_with_its_help(path):
    from click.testing import CliRunner

    text = " ".join(CliRunner().invoke(app, [*path.split(), "--help"]).output.split())
    cmd = command(path)
    for param in cmd.params:
        if isinstance(param, click.Option) and param.help:
            assert param.help.split("[")[0].strip()[:30] in text, (path, param.name)
    assert "[default:" in text or "[required]" in text
