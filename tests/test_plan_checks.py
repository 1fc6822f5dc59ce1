"""Every stage of a plan is checked before Ray starts; hashes of unchanged configs never move;
the CLI and a plan give the same config.json for the same values."""

import json
import re
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from pipelines.plan import load_plan, stage_hashes

HERE = Path(__file__).parent
TINY = HERE / "plans" / "tiny.yaml"


def tiny() -> dict:
    plan = yaml.safe_load(TINY.read_text())
    # Stages of every other kind, so that their nested configs are checked too.
    plan["stages"]["sweep"] = {"kind": "sweep", "data": "data", "lora_r": [2, 4], "lr": [1.0e-3]}
    plan["stages"]["b7"] = {"kind": "eval", "suite": "localization", "vectors": ["random"]}
    plan["stages"]["phase-c"] = {"kind": "localize", "config": {"n_train": 30}}
    plan["stages"]["stance"] = {"kind": "stance", "config": {"max_steps": 2}}
    return plan


def edit(path: str, value):
    """Set ``stages.b1.options.n_per_tier``-style ``path`` in the plan to ``value``."""

    def apply(plan: dict) -> str:
        *parents, last = path.split(".")
        node = plan
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        return yaml.safe_dump(plan, sort_keys=False)

    return apply


def raw(old: str, new: str):
    """A text edit of the YAML itself (for what a dict cannot hold: a key given twice)."""

    def apply(plan: dict) -> str:
        text = yaml.safe_dump(plan, sort_keys=False)
        assert old in text, old
        return text.replace(old, new, 1)

    return apply


MALFORMED = [
    # wrong types
    ("a string for an int", edit("stages.data.n", "many"), "stages.data.n"),
    ("a float for an int", edit("stages.data.n", 48.5), "stages.data.n"),
    ("a string for a bool", edit("stages.b1.options.food", "yes"), "stages.b1.options.food"),
    (
        "a string for a float",
        edit("stages.original.overrides.lr", "fast"),
        "stages.original.overrides.lr",
    ),  # fmt: skip
    (
        "a quoted number for an int",
        edit("stages.b1.options.n_per_tier", "8"),
        "stages.b1.options.n_per_tier",
    ),  # fmt: skip
    (
        "a string in a list of ranks",
        edit("stages.sweep.lora_r", [2, "four"]),
        "stages.sweep.lora_r",
    ),
    ("hosts: true", edit("stages.b1.hosts", True), "stages.b1.hosts"),
    # unknown keys, at every level
    ("top level", edit("colour", "red"), "colour: unknown key"),
    ("resources", edit("resources.gpus", 4), "resources.gpus: unknown key"),
    ("a stage", edit("stages.data.magnitude", [1.0]), "stages.data.magnitude: unknown key"),
    ("eval options", edit("stages.b1.options.n_sampels", 3), "stages.b1.options.n_sampels"),
    (
        "train overrides",
        edit("stages.original.overrides.lr_max", 1.0),
        "stages.original.overrides.lr_max",
    ),  # fmt: skip
    ("localize config", edit("stages.phase-c.config.n_trian", 5), "stages.phase-c.config.n_trian"),
    (
        "localize training",
        edit("stages.phase-c.config.train", {"lrr": 1.0}),
        "stages.phase-c.config.train",
    ),  # fmt: skip
    ("stance config", edit("stages.stance.config.max_stpes", 5), "stages.stance.config.max_stpes"),
    ("a plan-filled option", edit("stages.b1.options.model", "x"), "stages.b1.options.model"),
    # out of range
    ("val_fraction 1.5", edit("stages.data.val_fraction", 1.5), "stages.data.val_fraction"),
    (
        "batch size 0",
        edit("stages.original.overrides.batch_size", 0),
        "stages.original.overrides.batch_size",
    ),  # fmt: skip
    ("a rank of 0 in a sweep", edit("stages.sweep.lora_r", [0, 4]), "stages.sweep.lora_r"),
    ("n_per_tier 0", edit("stages.b1.options.n_per_tier", 0), "stages.b1.options.n_per_tier"),
    ("a negative rate", edit("cost.usd_per_cpu_hour", -1.0), "cost.usd_per_cpu_hour"),
    ("negative hosts", edit("stages.b1.hosts", -1), "stages.b1.hosts"),
    # names that do not exist
    ("suite", edit("stages.b1.suite", "vibes"), "stages.b1.suite"),
    ("preset", edit("stages.original.preset", "orignal"), "stages.original.preset"),
    ("variant", edit("stages.data.variant", "salty"), "stages.data.variant"),
    ("kind", edit("stages.data.kind", "bake"), "stages.data: unknown kind 'bake'"),
    (
        "B7 question",
        edit("stages.b7.options.questions", ["colour"]),
        "stages.b7.options.questions",
    ),  # fmt: skip
    (
        "Phase C question",
        edit("stages.phase-c.config.questions", ["colour"]),
        "stages.phase-c.config.questions",
    ),  # fmt: skip
    (
        "magnitude mode",
        edit("stages.b1.options.magnitude_mode", "loud"),
        "stages.b1.options.magnitude_mode",
    ),  # fmt: skip
    # duplicates
    (
        "a stage name twice",
        raw("  data-food:\n", "  data:\n    kind: data\n    vectors: random\n  data-food:\n"),
        "stages.data: given twice",
    ),
    (
        "a key twice in a stage",
        raw("    n_train: 10\n", "    n_train: 10\n    n_train: 12\n"),
        "stages.random.n_train: given twice",
    ),  # fmt: skip
    # references
    (
        "a missing stage",
        edit("stages.b1.models", ["base", "nope"]),
        "stages.b1: refers to unknown stage 'nope'",
    ),  # fmt: skip
    (
        "a wrong-kind stage",
        edit("stages.original.data", "random"),
        "stages.original: 'random' is a vectors stage, expected data",
    ),  # fmt: skip
    (
        "data of another variant",
        edit("stages.food-control.data", "data"),
        "stages.food-control.data: preset 'food-control' expects 'food-control' data",
    ),  # fmt: skip
    ("a dependency cycle", edit("stages.random.after", ["b1"]), "stages.random: dependency cycle"),
    (
        "concept vectors from a data stage",
        edit("stages.phase-c.concept_vectors", "data"),
        "stages.phase-c: 'data' is a data stage, expected vectors",
    ),  # fmt: skip
    (
        "an eval of a data stage's model",
        edit("stages.b1.models", ["base", "data"]),
        "stages.b1: 'data' is a data stage, expected train or localize",
    ),  # fmt: skip
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``introspect ARGS`` in this process: its exit code and stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("what, change, field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_introspect_run_refuses_a_malformed_plan_before_ray_starts(
    tmp_path, capsys, what, change, field
):
    import ray

    path = tmp_path / "bad.yaml"
    path.write_text(change(tiny()))
    runs = tmp_path / "runs"
    code, err = run_cli(["run", str(path), "--runs-dir", str(runs)], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: {field}"), lines[0]
    assert not runs.exists() and not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_the_plan_with_every_kind_of_stage_is_valid_as_it_is(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    assert set(load_plan(path).stages) >= {"sweep", "b7", "phase-c", "stance"}


def test_phase_c_models_are_evaluated_and_read_their_concept_vectors(tmp_path):
    from pipelines.plan import stage_configs

    plan = tiny()
    plan["stages"]["phase-c"]["concept_vectors"] = "random"
    plan["stages"]["b7"]["models"] = ["base", "phase-c"]
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(path)
    inputs = {n: tmp_path / n for n in loaded.stages}
    (_, _, localize), = stage_configs(loaded, "phase-c", inputs)
    assert localize.concept_vectors == str(tmp_path / "random" / "random.safetensors")
    evals = dict((m, c) for m, _, c in stage_configs(loaded, "b7", inputs))
    assert evals["phase-c"].adapter == str(tmp_path / "phase-c" / "run")
    assert evals["base"].adapter is None


def test_yaml_means_what_a_person_means(tmp_path):
    text = TINY.read_text().replace("lr: 1.0e-3", "lr: 1e-3")
    assert "lr: 1e-3" in text
    (tmp_path / "p.yaml").write_text(text)
    plan = load_plan(tmp_path / "p.yaml")
    assert plan.stages["original"].overrides["lr"] == 0.001
    # Written either way, the same stage: the same hash.
    assert stage_hashes(plan) == stage_hashes(load_plan(TINY))


def test_hashes_of_the_shipped_plans_are_what_they_were():
    """tests/data/stage_hashes.json was written by the code before configs were typed
    (commit ef50a29): run directories made then are still found now."""
    recorded = json.loads((HERE / "data" / "stage_hashes.json").read_text())
    root = HERE.parent
    for path, hashes in recorded.items():
        # The shipped plans as they were then (edited since: new stages, new settings).
        shipped = path.startswith("plans/")
        where = HERE / "data" / "plans_ef50a29" / Path(path).name if shipped else root / path
        now = stage_hashes(load_plan(where))
        if path == "tests/plans/tiny.yaml":
            # Its b1 options now say `magnitude_mode: absolute`, which they meant when B1's
            # default was absolute: a changed stage, so a changed hash. The rest stay.
            assert now.pop("b1") != hashes.pop("b1")
        assert now == hashes, path


def test_a_field_added_later_enters_the_hash_only_when_set(tmp_path):
    plan = yaml.safe_load(TINY.read_text())
    base = stage_hashes(load_plan(TINY))
    plan["stages"]["data"]["steered_fraction"] = 0.5  # new since hashes were kept; its default
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(plan))
    assert stage_hashes(load_plan(tmp_path / "a.yaml")) == base
    plan["stages"]["data"]["steered_fraction"] = 0.25
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(plan))
    changed = stage_hashes(load_plan(tmp_path / "b.yaml"))
    assert {k for k in base if base[k] != changed[k]} == {"data", "original", "b1"}


def test_the_cli_and_a_plan_write_the_same_config_json(tmp_path, capsys):
    """The same values through `introspect data` and through a plan's data stage."""
    from pipelines.plan import parse_plan
    from pipelines.stages import run_stage

    plan = parse_plan(
        {
            "name": "same",
            "model": "tiny-random",
            "stages": {
                "random": {"kind": "vectors", "n": 20, "n_train": 10},
                "data": {
                    "kind": "data",
                    "vectors": "random",
                    "n": 24,
                    "seed": 3,
                    "magnitudes": [8.0, 16.0],
                    "magnitude_mode": "absolute",
                },  # fmt: skip
            },
        }
    )
    stage_dir = {name: tmp_path / "plan" / name for name in plan.stages}
    for name in ("random", "data"):
        stage_dir[name].mkdir(parents=True)
        run_stage(plan, name, None, stage_dir[name], stage_dir, str(tmp_path / "ray"))
    vectors = stage_dir["random"] / "random.safetensors"
    cli = tmp_path / "cli"
    code, err = run_cli(
        ["vectors", "random", "--model", "tiny-random", "--n", "20", "--n-train", "10",
         "--out", str(tmp_path / "random.safetensors")], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "random.config.json").read_bytes() == (
        stage_dir["random"] / "random.config.json"
    ).read_bytes()
    code, err = run_cli(
        ["data", "--model", "tiny-random", "--vectors", str(vectors), "--n", "24", "--seed", "3",
         "--magnitudes", "8,16", "--magnitude-mode", "absolute", "--out", str(cli)], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (cli / "config.json").read_bytes() == (stage_dir["data"] / "config.json").read_bytes()
    assert re.search(r'"magnitudes": \[\s*8.0,\s*16.0\s*\]', (cli / "config.json").read_text())


def test_a_cpu_whose_default_became_bf16_gets_new_hashes(monkeypatch, tmp_path):
    """Runs made under the old fp32 default are not taken for bf16 ones; naming the dtype the
    default gives anyway hashes a stage that is no training (nor reads one) as leaving it out
    does."""
    from introspect import precision

    fp32 = stage_hashes(load_plan(TINY))
    monkeypatch.setenv("INTROSPECT_CPU_BF16", "1")
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    bf16 = stage_hashes(load_plan(TINY))
    assert all(bf16[name] != fp32[name] for name in fp32)
    plan = yaml.safe_load(TINY.read_text())
    plan.setdefault("resources", {})["dtype"] = "bfloat16"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan))
    named = stage_hashes(load_plan(tmp_path / "p.yaml"))
    assert named["data"] == bf16["data"] and named["random"] == bf16["random"]
    monkeypatch.setenv("INTROSPECT_CPU_BF16", "0")
    assert stage_hashes(load_plan(TINY)) == fp32
