"""The real plans/v2.yaml, end to end on a fake 4-GPU cluster, with only the model and sizes
rewritten: gradient checkpointing, bf16, host pools, the system prompt, cpus_per_worker,
max_failures and every stage kind and suite stay as the plan says."""

import copy
import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from introspect.io import load_yaml
from pipelines.placement import unit_need
from pipelines.plan import parse_plan
from pipelines.runner import pool_key, run_plan

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"detection", "behavioral", "identity", "self-prediction", "calibration", "concepts",
          "localization"}  # fmt: skip


def shrunk(plan: dict, runs: Path) -> dict:
    """v2 at tiny-random's scale: the model and sizes change, every other setting stays."""
    p = copy.deepcopy(plan)
    p["model"], p["runs_dir"] = "tiny-random", str(runs)
    small_run = {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                 "save_every": 2, "val_max_examples": 8}  # fmt: skip
    for s in p["stages"].values():
        if s["kind"] == "vectors" and s["type"] == "concepts":
            s["n"] = 4
        elif s["kind"] == "data":
            s["n"] = 48
        elif s["kind"] in ("train", "sweep"):
            s["overrides"] = {k: v for k, v in s["overrides"].items() if k != "epochs"}
            s["overrides"].update(small_run)
            if s["kind"] == "sweep":
                s["lora_r"], s["lr"] = s["lora_r"][:1], s["lr"][:1]
        elif s["kind"] == "eval":
            options = s["options"]
            if "full" in options:
                options["full"] = False
            if s["suite"] == "detection":
                options.update(n_per_tier=4, batch_size=8)
            if s["suite"] == "self-prediction":
                options["n_per_task"] = 1
                # The shared sample sits beside the repo when it is there; ours always does.
                dirs = [(ROOT / d).resolve() for d in options["binder_dir"]]
                options["binder_dir"] = [str(d) for d in dirs if d.is_dir()]
            if s["suite"] == "identity":
                options.update(n_questions=2, n_samples=1, max_new_tokens=8)
            if s["suite"] == "calibration":
                options.update(n_prompts=2, n_samples=2)
            if s["suite"] == "concepts":
                options.update(n_concepts=2, max_new_tokens=6)
            if s["suite"] == "localization":
                options["n_per_question"] = 6
        elif s["kind"] == "localize":
            c = s["config"]
            c.update(full=False, n_train=24, n_val=6, n_per_question=6)
            c["train"] = {k: v for k, v in c["train"].items() if k != "epochs"} | small_run
    return p


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    loads = tmp_path_factory.mktemp("loads") / "loads.jsonl"
    # v2's cpus_per_worker is 4: four nodes of one GPU and four CPUs each, and a CPU head
    # that holds three CPU stages at once (the data stages).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 12, "include_dashboard": False})
    for _ in range(4):
        c.add_node(num_cpus=4, num_gpus=1)
    env = {"INTROSPECT_LOAD_LOG": str(loads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": env})
    yield loads
    ray.shutdown()
    c.shutdown()


def test_v2_runs_end_to_end_and_every_model_load_holds_a_gpu(cluster, tmp_path):
    v2 = load_yaml(ROOT / "plans" / "v2.yaml", "plan")
    data = shrunk(v2, tmp_path / "runs")
    # What the test keeps from the real plan.
    assert data["resources"] == v2["resources"]
    assert data["resources"]["cpus_per_worker"] == 4 and data["resources"]["use_gpu"]
    trains = [s for s in data["stages"].values() if s["kind"] in ("train", "sweep")]
    assert all(s["overrides"]["gradient_checkpointing"] for s in trains)
    plan = parse_plan(data, "v2 (tiny)")
    kinds = {s.kind for s in plan.stages.values()}
    assert kinds == {"vectors", "norms", "data", "train", "sweep", "eval", "localize"}
    assert {s.suite for s in plan.stages.values() if s.kind == "eval"} == SUITES

    status = run_plan(plan, progress=False)
    bad = {k: str(v) for k, v in status.items() if not v.ok}
    assert not bad, bad

    loads = [json.loads(x) for x in cluster.read_text().splitlines()]
    # Ray hands each GPU task its GPU through CUDA_VISIBLE_DEVICES (fake GPUs too).
    assert loads and all(len((e["visible_gpus"] or "").split(",")) == 1 for e in loads), loads
    assert all(e["visible_gpus"] for e in loads), loads
    # The data stages read the norms stage; pooled evaluations load nothing in their driver.
    tasks = [e["process"].removeprefix("ray::") for e in loads]
    assert not [t for t in tasks if t.startswith("stage:data")], tasks
    pooled = {f"stage:{n}" for n, s in plan.stages.items() if s.kind == "eval" and s.hosts}
    assert not pooled & set(tasks), tasks
    assert tasks.count("stage:norms") == 1
    root = tmp_path / "runs" / "v2"
    statuses = json.loads((root / "status.json").read_text())
    assert set(statuses.values()) == {"done"}
    # A pool starts when its GPUs are free, so it never waits behind a training for them
    # (it used to wait, and to give up after 600 s).
    waits = {str(t.relative_to(root)): json.loads(t.read_text())["pool_wait_s"]
             for t in root.glob("b*/*/*/timing.json")}  # fmt: skip
    assert len(waits) == sum(len(s.models) for s in plan.stages.values() if s.kind == "eval")
    assert max(waits.values()) < 10, waits
    # The runner admits units by the GPUs they hold: never more than the cluster's four at
    # once, and all four in use at some moment (four trainings ran side by side here).
    held, pools = [], {}
    for name, stage in plan.stages.items():
        gpus = unit_need(plan, name, {"CPU": 28.0, "GPU": 4.0})["GPU"]
        pattern = f"{name}/*/*/timing.json" if stage.kind == "eval" else f"{name}/*/timing.json"
        for t in root.glob(pattern):
            timing = json.loads(t.read_text())
            if stage.kind == "eval" and stage.hosts:  # a shared pool holds its GPUs throughout
                a, b, _ = pools.get(pool_key(plan, name), (timing["started"], 0, gpus))
                pools[pool_key(plan, name)] = (
                    min(a, timing["started"]),
                    max(b, timing["ended"]),
                    gpus,
                )
            elif gpus:
                held.append((timing["started"], timing["ended"], gpus))
    held += pools.values()
    moments = sorted({a for a, _, _ in held})
    in_use = [sum(g for a, b, g in held if a <= m < b) for m in moments]
    assert max(in_use) == 4, in_use
