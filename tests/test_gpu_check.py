"""benchmarks/gpu_check.py at tiny sizes on CPU: every check runs, so the script stays alive."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_every_gpu_check_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (tiny sizes)"
    assert result["scoring"]["max_p_yes_difference"] < 1e-4  # batched == per example
    assert result["scoring"]["speedup"] > 0 and result["lora_training"]["tokens_per_s"] > 0
    assert result["memory_32b"]["estimate_gib"] > 0
    assert result["zero3"]["met"] and result["model_host"]["met"]
