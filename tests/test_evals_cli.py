"""The eval commands, generated from the suites' configs: every field a flag, errors one line."""

import json

import pytest
from click.testing import CliRunner

from cluster.cli import app

pytestmark = pytest.mark.evals


def invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def test_every_suite_has_a_command_and_help_lists_every_field():
    from pipelines.recipes import recipe

    listing = invoke("eval", "--help").output
    for suite in ("detection", "behavioral", "identity", "self-prediction", "calibration",
                  "concepts", "localization"):  # fmt: skip
        assert suite in listing
        text = invoke("eval", suite, "--help").output
        for name, field in recipe(f"eval.{suite}").config.model_fields.items():
            kind = "--" + name.replace("_", "-")
            assert kind in text, (suite, kind)
            assert (field.description or "")[:20] in " ".join(text.split()), (suite, name)
    assert "train-localization" in invoke("--help").output


def test_behavioral_command_runs_on_tiny(tmp_path):
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps({"categories": {"self": ["Are you aware?", "Do you feel?"]}}))
    out = tmp_path / "out"
    result = invoke("eval", "behavioral", "--model", "tiny-random", "--out", out,
                    "--questions", qfile)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_questions"] == 2
    assert json.loads((out / "config.json").read_text())["questions"] == str(qfile)


def test_a_config_file_and_flags_over_it(tmp_path):
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps({"categories": {"self": ["Are you aware?"]}}))
    cfg = tmp_path / "b2.yaml"
    cfg.write_text(f"model: tiny-random\nquestions: {qfile}\nbatch_size: 3\n")
    out = tmp_path / "out"
    result = invoke("eval", "behavioral", "--config", cfg, "--batch-size", 2, "--out", out)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "config.json").read_text())
    assert written["batch_size"] == 2 and written["model"] == "tiny-random"


def test_self_prediction_without_data_fails_before_loading(tmp_path):
    result = invoke("eval", "self-prediction", "--model", "tiny-random", "--out", tmp_path / "o",
                    "--binder-dir", tmp_path / "none")  # fmt: skip
    assert result.exit_code != 0
    assert "binder_dir" in str(result.exception)
    assert not (tmp_path / "o").exists()
