"""What a plan's units hold and need: per-model inputs, device reservations, infeasible plans."""

import pytest

from introspect.errors import IntrospectError
from introspect.io import load_yaml
from pipelines.placement import check_feasible, unit_need
from pipelines.plan import parse_plan
from pipelines.runner import units

V2 = "plans/v2.yaml"


def v2(**resources):
    data = load_yaml(V2, "plan")
    data["resources"].update(resources)
    return parse_plan(data, V2)


def test_an_eval_unit_needs_only_its_own_models_training():
    """One failed training used to block B1 on the base model: every model unit of an eval
    stage got the whole stage's inputs."""
    needs = {u.key: set(u.needs) for u in units(v2())}
    assert needs["b1[base]"] == {"random", "concepts"}
    assert needs["b1[r1-minimal]"] == {"random", "concepts", "r1-minimal"}
    assert needs["b2[food-control]"] == {"food-control"}
    assert needs["data-vague"] == {"random", "norms"}


def test_every_unit_that_loads_a_model_holds_a_gpu_on_a_gpu_plan():
    plan = v2()
    need = {name: unit_need(plan, name) for name in plan.stages}
    for name in ("norms", "concepts", "phase-c"):
        assert need[name]["GPU"] == 1, name
    # Random vectors need only the model's shape; data stages read the norms stage.
    assert need["random"]["GPU"] == 0 and need["data-original"]["GPU"] == 0
    assert need["original"] == {"CPU": 4.0, "GPU": 1.0}
    assert need["b1"] == {"CPU": 16.0, "GPU": 4.0}  # a pool of four hosts
    # A sweep holds as many trials as fit at once (Tune runs that many).
    assert unit_need(plan, "sweep", {"CPU": 64.0, "GPU": 4.0})["GPU"] == 4
    data = load_yaml(V2, "plan")
    del data["stages"]["data-original"]["norms"]
    alone = parse_plan(data, V2)
    assert unit_need(alone, "data-original")["GPU"] == 1  # measures the norms itself


def test_a_request_the_cluster_can_never_meet_is_refused_in_one_line():
    """cpus_per_worker: 4 on a 2-CPU machine used to be queued by Ray forever, silently."""
    plan = v2()
    with pytest.raises(IntrospectError) as e:
        check_feasible(plan, list(plan.stages), {"CPU": 2.0, "GPU": 4.0})
    line = str(e.value)
    assert line.startswith("stages.") and "needs 4 CPUs, the cluster has 2" in line
    assert "resources.cpus_per_worker" in line and "\n" not in line
    with pytest.raises(IntrospectError, match=r"stages.b1: needs 4 GPUs \(4 hosts\), .* has 2"):
        check_feasible(plan, ["b1"], {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(IntrospectError, match="stages.original: needs 1 GPU, the cluster has 0"):
        check_feasible(plan, ["original"], {"CPU": 64.0})
    check_feasible(plan, list(plan.stages), {"CPU": 64.0, "GPU": 4.0})


def test_a_worker_larger_than_every_node_is_refused_too():
    """20 CPUs in all, but no node has the 8 a worker needs: Ray would queue it forever."""
    plan = v2(cpus_per_worker=8)
    nodes = [{"CPU": 4.0, "GPU": 1.0}] * 4 + [{"CPU": 4.0}]
    with pytest.raises(IntrospectError) as e:
        check_feasible(plan, ["original"], {"CPU": 20.0, "GPU": 4.0}, nodes)
    assert str(e.value) == (
        "stages.original: each worker needs 8 CPU, 1 GPU, no node has that (the largest has "
        "4 CPU, 1 GPU); lower resources.cpus_per_worker"
    )
    check_feasible(v2(), ["original", "b1", "norms"], {"CPU": 20.0, "GPU": 4.0}, nodes)
