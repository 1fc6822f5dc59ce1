"""The eval commands, registered on a fresh app the way cluster/cli.py registers them."""

import json

import pytest
import typer
from typer.testing import CliRunner

from cluster.cli_evals import register_evals

pytestmark = pytest.mark.evals


def make_app() -> typer.Typer:
    app = typer.Typer()
    eval_app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    register_evals(app, eval_app)
    return app


def test_commands_are_registered():
    result = CliRunner().invoke(make_app(), ["eval", "--help"])
    for name in ("behavioral", "identity", "self-prediction", "calibration", "concepts"):
        assert name in result.output
    assert "localization" in result.output
    assert "train-localization" in CliRunner().invoke(make_app(), ["--help"]).output


def test_behavioral_command_runs_on_tiny(tmp_path):
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps({"categories": {"self": ["Are you aware?", "Do you feel?"]}}))
    out = tmp_path / "out"
    args = ["eval", "behavioral", "--model", "tiny-random", "--out", str(out)]
    result = CliRunner().invoke(make_app(), [*args, "--questions", str(qfile)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_questions"] == 2


def test_self_prediction_without_data_fails_before_loading(tmp_path):
    args = ["eval", "self-prediction", "--model", "tiny-random", "--out", str(tmp_path)]
    result = CliRunner().invoke(make_app(), [*args, "--binder-dir", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert "binder_dir:" in str(result.exception)
