"""`introspect export`: a Hub-ready folder from a run, its model card, and the weights it holds.

One tiny-random run made through the recipes (vectors, data, train, B1 on it and on the base
model) is exported standalone and as a plan's train stage; the card is parsed with
huggingface_hub and the exported adapter, loaded back with peft, scores as the run does.
"""

import json
import os
import shutil
import time

import pytest
import torch
from huggingface_hub import ModelCard

from introspect import models
from introspect.errors import IntrospectError
from introspect.examples import read_examples, score_examples
from introspect.export import base_license, export_run, find_run, hub_id
from introspect.io import load_yaml
from introspect.io import sha256_file as sha256
from introspect.runs import load_evaluated
from introspect.vectors import load_vectors
from pipelines.recipes import recipe, run_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Vectors, data, a 6-step r1-minimal run and B1 of it and of the base model."""
    d = tmp_path_factory.mktemp("export")
    v = d / "random.safetensors"
    run_recipe("vectors", recipe("vectors").parse({"model": "tiny-random", "n": 20}), v)
    data = {"model": "tiny-random", "vectors": str(v), "n": 40, "val_fraction": 0.25}
    run_recipe("data", recipe("data").parse(data), d / "data")
    train = {
        "model": "tiny-random", "data": str(d / "data"), "vectors": [str(v)],
        "preset": "r1-minimal", "max_steps": 6, "warmup_steps": 1, "batch_size": 4,
        "eval_every": 3, "save_every": 3, "lr": 1e-3,
    }  # fmt: skip
    run_recipe("train", recipe("train").parse(train), d / "run")
    for label, adapter in (("r1", str(d / "run")), (None, None)):
        b1 = {"model": "tiny-random", "vectors": str(v), "n_per_tier": 6, "label": label,
              "min_mass": 0.0}  # tiny-random's yes+no mass is ~0: keep every row
        b1 |= {"adapter": adapter} if adapter else {}
        run_recipe("eval.detection", recipe("eval.detection").parse(b1), d / f"b1-{label}")
    return d


def scores(lm, made):
    val = read_examples(made / "data" / "val.parquet")
    vs = load_vectors(made / "random.safetensors", lm.d_model)
    return score_examples(lm, val, {vs.name: vs}, batch_size=4).p_yes.to_numpy()


def test_folder_holds_the_adapter_and_scores_as_the_run(made, tmp_path):
    from peft import PeftModel

    info = export_run(made / "run", tmp_path / "hub", evals=[str(made / "b1-r1")])
    out = tmp_path / "hub"
    assert info["export"] == "best"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(info["files"])
    assert not (out / "config.json").exists()  # the training config is training_config.json
    assert json.loads((out / "training_config.json").read_text())["preset"] == "r1-minimal"
    # Loaded back with peft on a fresh base: the same scores as the run's evaluated model.
    base = models.load("tiny-random", device="cpu")
    base.model = PeftModel.from_pretrained(base.model, str(out)).eval()
    expected = scores(load_evaluated("tiny-random", made / "run"), made)
    assert scores(base, made) == pytest.approx(expected, abs=1e-6)
    lines = (out / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))


def test_card_front_matter_and_body(made, tmp_path):
    export_run(made / "run", tmp_path / "hub", evals=[str(made / "b1-r1"), str(made / "b1-None")])
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.library_name == "peft"
    assert {"introspect", "lora", "r1-minimal"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.license is None  # tiny-random: no Hub id
    text = card.text
    assert sha256(made / "random.safetensors") in text
    assert sha256(made / "data" / "train.parquet") in text
    assert "Variant `original`: 40 examples" in text
    assert "`lora_r` | `1`" in text  # the configuration table
    # B1 rows for this run and the base model, with intervals, straight from metrics.json.
    for name in ("r1", "base"):
        held = json.loads((made / f"b1-{name if name == 'r1' else 'None'}" / "metrics.json")
                          .read_text())["tiers"]["held_out"]  # fmt: skip
        lo, hi = held["ci"]["accuracy"]
        assert f"| {name} | held_out | {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    assert "**r1** (r1-minimal)" in text
    assert "introspect train --config reproduce/train.yaml --data data/" in text
    assert "What success looks like" not in text  # no plan, no verdicts


def test_an_alias_base_gets_its_hub_id_and_license(made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "smollm2-135m"}))
    export_run(run, tmp_path / "hub")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert "de-quantised from the Q4_1 GGUF" in card.text
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card.text
    adapter = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The run's own adapter_config.json is untouched (the export links, never writes through).
    kept = json.loads((run / "best" / "adapter_config.json").read_text())
    assert kept["base_model_name_or_path"] != "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_reproduce_configs_rebuild_the_same_configs(made, tmp_path):
    export_run(made / "run", tmp_path / "hub")
    r = tmp_path / "hub" / "reproduce"
    v = str(made / "random.safetensors")
    vectors = recipe("vectors").parse(load_yaml(r / "vectors-random.yaml"))
    assert vectors == recipe("vectors").parse(json.loads((made / "random.config.json").read_text()))
    data = recipe("data").parse({**load_yaml(r / "data.yaml"), "vectors": v})
    assert data == recipe("data").parse(json.loads((made / "data" / "config.json").read_text()))
    train = recipe("train").parse(
        {**load_yaml(r / "train.yaml"), "data": str(made / "data"), "vectors": [v]}
    )
    assert train == recipe("train").parse(json.loads((made / "run" / "config.json").read_text()))


def plan_root(made, tmp_path):
    """The run as stage `orig` of a plan, B1 of it (and base) in stage `b1`, and an older B1
    unit of another `orig` run (newer on disk) that the export must not take, and that the
    report's verdicts do not read either (stages.json names the plan's current hashes)."""
    root = tmp_path / "runs" / "p"
    stage = root / "orig" / "abc123"
    shutil.copytree(made / "run", stage / "run")
    (stage / "COMPLETE").write_text("1")
    stages = {
        "random": {"kind": "vectors"},
        "d": {"kind": "data", "variant": "original"},
        "orig": {"kind": "train", "preset": "r1-minimal", "data": "d"},
        "b1": {"kind": "eval", "suite": "detection", "models": ["base", "orig"]},
    }
    plan = {"name": "p", "model": "tiny-random", "stages": stages}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "stages.json").write_text(json.dumps({"orig": "abc123", "b1": "h1"}))
    for h, adapter in (("h1", stage / "run"), ("h0", root / "orig" / "zzz" / "run")):
        for model, src in (("orig", "b1-r1"), ("base", "b1-None")):
            unit = root / "b1" / h / model
            unit.mkdir(parents=True)
            metrics = json.loads((made / src / "metrics.json").read_text())
            if model == "orig":
                metrics |= {"adapter": str(adapter), "label": "orig"}
            if h == "h0":  # a count no real unit here has
                metrics["tiers"]["held_out"] |= {"n_steered": 7777, "n_unsteered": 7777}
            (unit / "metrics.json").write_text(json.dumps(metrics))
            (unit / "COMPLETE").write_text("1")
    later = time.time() + 10
    os.utime(root / "b1" / "h0", (later, later))
    return root, stage


def test_plan_stage_finds_its_b1_and_verdicts(made, tmp_path):
    root, stage = plan_root(made, tmp_path)
    assert find_run(stage / "run").stage == stage  # the stage's run/ means the stage too
    export_run(stage, tmp_path / "hub")
    text = ModelCard.load(tmp_path / "hub" / "README.md").text
    held = json.loads((root / "b1" / "h1" / "orig" / "metrics.json").read_text())
    acc = held["tiers"]["held_out"]["accuracy"]
    assert f"| orig | held_out | {acc:.3f}" in text
    assert "7777/7777" not in text and "n = 15554" not in text  # neither table nor verdicts
    assert "| base | held_out |" in text
    assert "What success looks like" in text and "r1-minimal" in text
    assert "introspect run reproduce/plan.yaml" in text
    assert load_yaml(tmp_path / "hub" / "reproduce" / "plan.yaml")["stages"]["orig"]["preset"]


def test_full_finetuning_exports_the_whole_model(made, tmp_path):
    from transformers import AutoModelForCausalLM

    from introspect.train import preset, train

    lm = models.load("tiny-random", device="cpu")
    vs = load_vectors(made / "random.safetensors", lm.d_model)
    df = read_examples(made / "data" / "train.parquet")
    config = preset("original", method="full", max_steps=2, warmup_steps=1, batch_size=4, lr=1e-4)
    train(lm, df, read_examples(made / "data" / "val.parquet"), {vs.name: vs}, config,
          tmp_path / "run")  # fmt: skip
    export_run(tmp_path / "run", tmp_path / "hub", which="final")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.library_name == "transformers" and "full-finetune" in card.data.tags
    assert "trained through the Python API" in card.text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    back = models.LoadedModel(model, lm.tokenizer, "exported")
    assert scores(back, made) == pytest.approx(
        scores(load_evaluated("tiny-random", tmp_path / "run" / "final"), made), abs=1e-6
    )


def test_the_command_and_push(made, tmp_path, monkeypatch):
    import huggingface_hub
    from click.testing import CliRunner

    from cluster.commands import recipe_command

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("c", a, k)))
    monkeypatch.setattr(
        huggingface_hub, "upload_folder", lambda **k: calls.append(("u", k)) or "https://hub/x"
    )
    cmd = recipe_command("export", "export", arguments=("run",))
    out = tmp_path / "hub"
    r = CliRunner().invoke(cmd, [str(made / "run"), "--out", str(out), "--push", "me/det"])
    assert r.exit_code == 0, r.output
    assert (out / "README.md").exists() and (tmp_path / "hub.config.json").exists()
    assert calls[0] == ("c", ("me/det",), {"private": False, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "me/det" and calls[1][1]["folder_path"] == str(out)
    assert 'models.load("tiny-random", adapter="me/det")' in (out / "README.md").read_text()
    assert "--push" in CliRunner().invoke(cmd, ["--help"]).output


def test_bad_input_is_one_line_naming_the_field(made, tmp_path):
    with pytest.raises(IntrospectError, match="^run: "):
        export_run(tmp_path, tmp_path / "hub")
    with pytest.raises(IntrospectError, match="^evals: .* no B1 results"):
        export_run(made / "run", tmp_path / "hub", evals=[str(made / "data")])
    with pytest.raises(IntrospectError, match="^out: "):
        export_run(made / "run", made / "run" / "hub")
    assert not (tmp_path / "hub").exists()


def test_base_model_ids_and_licenses(tmp_path):
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("tiny-random") is None and hub_id(str(tmp_path)) is None
    assert base_license("smollm2-135m") == "apache-2.0"
    assert base_license("Qwen/Qwen2.5-Coder-32B-Instruct") == "apache-2.0"
    assert base_license("Qwen/Qwen2.5-3B-Instruct") is None  # its own license: unknown here
    assert base_license("someone/model") is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\nA local model.\n")
    assert base_license(str(tmp_path)) == "mit"
