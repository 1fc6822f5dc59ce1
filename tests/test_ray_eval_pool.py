"""Evaluations on a ModelHost pool: the same metrics as in one process, alone and in a plan."""

import json
import logging

import pytest
import ray
from click.testing import CliRunner
from test_ray_hosts import CONCEPTS, RANDOM, lora_dir
from test_ray_hosts import pool as pool  # noqa: F401 - the 2-host tiny-random pool fixture

from actors.model_host import host_pool
from cluster.cli import app
from introspect.errors import IntrospectError
from introspect.evals.behavioral import run_behavioral
from introspect.evals.detection import run_detection
from introspect.evals.identity import run_identity
from introspect.vectors import save_vectors
from pipelines import stages as S
from pipelines.fanout import pool_mapper
from pipelines.plan import parse_plan
from pipelines.runner import COMPLETE, run_plan, stage_dirs

pytestmark = pytest.mark.ray
BOTH = ("base", "tuned")


def assert_same(a, b, where="metrics"):
    """Equal, floats to 1e-6 (shards batch rows differently: fp32 moves in the last digits)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


def shards_used(caplog) -> list[int]:
    return [r.args[1]["shards"] for r in caplog.records if r.msg.startswith("fan-out")]


def test_b1_on_a_pool_equals_in_process(pool, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.fanout")
    for vs in (RANDOM, CONCEPTS):
        save_vectors(tmp_path / f"{vs.name}.safetensors", vs)
    config = {
        "model": "tiny-random",
        "vectors": str(tmp_path / "random.safetensors"),
        "concepts": str(tmp_path / "concepts.safetensors"),
        "n_per_tier": 4,
        "magnitudes": [4.0, 16.0],
        "magnitude_mode": "absolute",
        "food": True,
        "batch_size": 8,
        "min_mass": 0.0,  # tiny-random's yes+no mass is ~0: keep every row
    }  # 3 tiers of 8 trials + 8 food trials: 4 shards of at most 10
    one = run_detection(config, tmp_path / "one")
    stats: list[dict] = []
    mapper = pool_mapper(pool, None, shard_size=10, progress=False, stats=stats)
    assert_same(run_detection(config, tmp_path / "pool", mapper=mapper), one)
    assert shards_used(caplog) == [4]
    assert [(s["shards"], s["retries"]) for s in stats] == [(4, 0)]
    # The CLI's --hosts: a pool of its own on the connected Ray (one CPU is still free).
    args = ["eval", "detection", "--model", "tiny-random", "--vectors", config["vectors"]]
    args += ["--concepts", config["concepts"], "--n-per-tier", "4", "--magnitudes", "4,16"]
    args += ["--magnitude-mode", "absolute"]
    args += ["--food", "--batch-size", "8", "--min-mass", "0", "--out", str(tmp_path / "cli")]
    args += ["--hosts", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_same(json.loads((tmp_path / "cli" / "metrics.json").read_text()), one)


def test_b2_b3_on_a_pool_equal_in_process(pool, tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.fanout")
    questions = {
        "categories": {"self": ["Are you aware?", "Do you feel?"], "world": ["Is ice cold?"]},
        "truth": {"world": ["yes"]},
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    runs = [  # (suite, config, shard size): 3 and 2 shards
        (run_behavioral, {"model": "tiny-random", "questions": str(tmp_path / "q.json"),
                          "min_mass": 0.0}, 1),
        (run_identity, {"model": "tiny-random", "n_questions": 2, "max_new_tokens": 4}, 3),
    ]
    for run, config, shard_size in runs:
        one = run(config, tmp_path / run.__name__ / "one", lm=tiny)
        mapper = pool_mapper(pool, None, shard_size=shard_size, progress=False)
        assert_same(run(config, tmp_path / run.__name__ / "pool", mapper=mapper), one)
    assert shards_used(caplog) == [3, 2]


def test_a_plan_stage_on_a_pool_writes_the_same_metrics(pool, tmp_path, monkeypatch):
    b1 = {
        "kind": "eval",
        "suite": "detection",
        "models": list(BOTH),
        "vectors": ["random"],
        "hosts": 2,
        "options": {
            "n_per_tier": 4,
            "magnitudes": [8.0, 16.0],
            "magnitude_mode": "absolute",
            "batch_size": 8,
            "min_mass": 0.0,
        },
    }
    plan = parse_plan(
        {
            "name": "pooled",
            "model": "tiny-random",
            "runs_dir": str(tmp_path / "runs"),
            "resources": {"cpus_per_worker": 0.5},  # the pool fixture holds the other CPU
            "stages": {
                "random": {"kind": "vectors", "n": 12, "n_train": 6},
                "data": {"kind": "data", "vectors": "random", "n": 8},
                "tuned": {"kind": "train", "data": "data"},
                "b1": b1,
            },
        }
    )
    dirs = stage_dirs(plan)
    # Finished stages stand in for real ones (only the pooled eval runs): the vectors, and a
    # LoRA adapter where the training run would be.
    save_vectors(dirs["random"] / "random.safetensors", RANDOM)
    lora_dir(dirs["tuned"] / "run", seed=2)
    for name in ("random", "data", "tuned"):
        dirs[name].mkdir(parents=True, exist_ok=True)
        (dirs[name] / COMPLETE).write_text("0")

    status = run_plan(plan, progress=False)
    assert {k: str(v) for k, v in status.items()} == {
        "random": "skipped", "data": "skipped", "tuned": "skipped"
    } | {
        f"b1[{m}]": "done" for m in BOTH
    }
    metrics = {}
    for model in BOTH:
        out = dirs["b1"] / model
        assert (out / COMPLETE).exists()
        timing = json.loads((out / "timing.json").read_text())
        assert timing["device_hours"] == pytest.approx(2 * timing["wall_s"] / 3600)  # 2 hosts
        # No host was lost, nothing came from an earlier try (the fan-outs' own counts).
        counts = ("shard_retries", "hosts_revived", "shard_backups", "shards_cached")
        assert [timing[k] for k in counts] == [0, 0, 0, 0]
        metrics[model] = json.loads((out / "metrics.json").read_text())
        one = tmp_path / "one" / model
        one.mkdir(parents=True)
        expected = S.run_stage(plan, "b1", model, one, dirs, str(tmp_path / "ray"))
        assert_same(metrics[model], expected)
    assert metrics["base"]["tiers"] != metrics["tuned"]["tiers"]  # the adapter was switched in

    # `hosts` changes where the models run, not what they compute: nothing reruns without it.
    plan.stages["b1"].hosts = 0
    assert {str(v) for v in run_plan(plan, progress=False).values()} == {"skipped"}
    # A stage's pool that cannot have its hosts (the plan was checked against the whole cluster,
    # so a node is lost) waits for the node, then starts on the hosts that are free.
    monkeypatch.setattr(S, "POOL_WAIT_S", 0.0)
    plan.stages["b1"].hosts = 9
    free = ray.available_resources().get("CPU", 0.0)  # what the pool fixture leaves: 1 CPU
    with S.stage_pool(plan, "b1") as short:
        assert (short.asked, len(short)) == (9, int(free // 0.5))
    # A whole cluster whose CPUs are partly held (the fixture's pool): 3 hosts fit the cluster
    # but their reservation cannot be placed; the stage goes on with the 2 that are free.
    plan.stages["b1"].hosts = 3
    with S.stage_pool(plan, "b1") as held:
        assert (held.asked, len(held)) == (3, int(free // 0.5))
    with pytest.raises(IntrospectError, match="could not be placed within 1 s"):
        host_pool("tiny-random", n=3, num_cpus=0.5, timeout_s=1)  # a direct call says so
