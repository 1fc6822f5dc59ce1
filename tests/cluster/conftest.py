"""Cluster tests run only when asked for: `pytest -m cluster tests/cluster` (make test-cluster)
or INTROSPECT_CLUSTER_TESTS=1. A plain `pytest` (make test) skips them. They need root, take
minutes, and start sshd and Ray in network namespaces.
"""

import os

import pytest


def cluster_tests_requested(config: pytest.Config) -> bool:
    """True when -m selects the cluster marker or INTROSPECT_CLUSTER_TESTS=1."""
    expr = config.getoption("markexpr") or ""
    selected = "cluster" in expr and "not cluster" not in expr
    return selected or os.environ.get("INTROSPECT_CLUSTER_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cluster_tests_requested(config):
        return
    skip = pytest.mark.skip(reason="real ssh + namespaces: run `make test-cluster`")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)
