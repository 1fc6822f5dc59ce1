"""ray_cluster.yaml passes Ray's own config validation and keeps its security settings.

`ray up` itself runs prepare_config + validate_config (jsonschema against Ray's
ray-schema.json, then Ray's own checks); so do these tests. tests/cluster runs the file for
real with `ray up`.
"""

import copy
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_cluster.yaml"


def _validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _flat(d, prefix=""):
    """{'a.b': value} for every leaf of nested dicts."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def _start_args(command: str) -> dict[str, str]:
    """KEY=VALUE environment prefixes and --flags of the `ray start` in one start command."""
    words = shlex.split(command.split(";")[-1])
    at = words.index("ray")
    env = dict(w.split("=", 1) for w in words[:at])
    flags = dict((w.split("=", 1) + [""])[:2] for w in words[at + 2 :] if w.startswith("--"))
    return env | flags


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_ray_cluster_yaml_passes_rays_validation(config):
    prepared = _validated(config)
    assert prepared["provider"]["type"] == "local"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_validation_rejects_a_broken_config(config):
    import jsonschema

    broken = copy.deepcopy(config)
    broken["auth"]["ssh_port"] = 22  # not a field Ray knows: a typo must not pass silently
    with pytest.raises(jsonschema.ValidationError):
        _validated(broken)


def test_token_auth_is_on_for_every_node_and_the_token_is_shipped(config):
    head = _start_args(config["head_start_ray_commands"][-1])
    worker = _start_args(config["worker_start_ray_commands"][-1])
    assert head["RAY_AUTH_MODE"] == "token" and worker["RAY_AUTH_MODE"] == "token"
    assert "--head" in head and worker["--address"] == "$RAY_HEAD_IP:6379"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Interactive `ray` commands on a box use the token too (the ~/.bashrc block).
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


def test_dashboard_and_job_api_bind_to_localhost_only(config):
    head = _start_args(config["head_start_ray_commands"][-1])
    assert head["--dashboard-host"] == "127.0.0.1"
    assert head["--dashboard-port"] == "8265"  # the port the SSH tunnel in the docs forwards
    assert "--include-dashboard" not in head or head["--include-dashboard"] == "true"


def test_autoscaler_v1_is_kept_so_local_workers_start(config):
    # Autoscaler v2 never starts local-provider workers (docs/cluster.md); v1 does.
    head = _start_args(config["head_start_ray_commands"][-1])
    assert head["RAY_enable_autoscaler_v2"] == "0"
    assert head["--autoscaling-config"] == "~/ray_bootstrap_config.yaml"


def test_placeholders_are_documentation_addresses(config):
    # Nobody's real box: 203.0.113.0/24 is reserved for documentation (RFC 5737).
    assert config["provider"]["head_ip"].startswith("203.0.113.")
    assert config["provider"]["worker_ips"] == []  # the main case: one multi-GPU box


def _load(name: str):
    """A module of tests/cluster (no package: pytest puts that directory on sys.path when it
    collects it, which a plain `pytest tests/` run does not)."""
    module = sys.modules.get(name)
    if module is None:
        path = REPO / "tests" / "cluster" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _load("harness")


def test_the_harness_changes_only_ips_user_and_key(config, harness):
    derived = harness.derive_config(config, "10.0.0.1", ["10.0.0.2"], "me", "/k")
    before, after = _flat(config), _flat(derived)
    assert set(before) == set(after)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"provider.head_ip", "provider.worker_ips", "auth.ssh_user",
                       "auth.ssh_private_key"}
    _validated(derived)


def test_the_fault_plan_runs_three_trainings_at_once_and_the_same_work_under_any_name(harness):
    # The cluster's fault scenarios compare each run with a clean one: runs differ only in their
    # names, so every stage hash must be the same; three trainings that need only the data
    # stage start together (more CPUs than the head has), and B1 evaluates all on three hosts.
    from pipelines.plan import inputs, parse_plan, stage_hashes

    faults = _load("faults")
    base = yaml.safe_load((REPO / faults.BASE).read_text())
    plans = {n: parse_plan(faults.fault_plan(base, n)) for n in ("faults-clean", "faults-x-0")}
    assert [p.name for p in plans.values()] == ["faults-clean", "faults-x-0"]
    hashes = [stage_hashes(p) for p in plans.values()]
    assert hashes[0] == hashes[1]
    plan = plans["faults-clean"]
    assert {k: inputs(plan.stages[k]) for k in faults.TRAININGS} == {
        k: ["data"] for k in faults.TRAININGS
    }
    assert plan.stages["b1"].models == ["base", *faults.TRAININGS]
    assert plan.stages["b1"].hosts == 3
    train = plan.stages["a"].overrides
    assert train["max_steps"] > 2 * faults.KILL_STEP and faults.KILL_STEP % train["save_every"] == 0
