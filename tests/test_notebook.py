"""examples/quickstart.ipynb runs top to bottom on a CPU within 3 minutes, and never loads Ray."""

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # One torch thread: beside other CPU-heavy processes (the suite's Ray workers), two OpenMP
    # threads spin-waiting on 2 shared cores took 305 s here, one thread 58 s (42 s when idle).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # One cell more, ours: whether anything the notebook ran imported Ray.
    nb.cells.append(
        nbformat.v4.new_code_cell("import sys\nprint('ray loaded:', 'ray' in sys.modules)")
    )
    started = time.time()
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    assert time.time() - started < 180
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the training-loss plot
    text = "".join(o.get("text", "") for o in outputs)
    assert "p_yes" in text and "steered" in text
    assert "ray loaded: False" in text
    work = tmp_path / "quickstart-out"
    assert (work / "run" / "final" / "adapter_model.safetensors").exists()
    b1 = json.loads((work / "b1" / "metrics.json").read_text())
    assert set(b1["tiers"]) == {"in_distribution", "held_out"}
    held = b1["tiers"]["held_out"]
    # 8 steered + 8 unsteered trials; rows under the mass filter are counted, not scored.
    assert held["n_rows"] == 16 and held["n_steered"] + held["n_unsteered"] + held["excluded"] == 16
    assert held["excluded"] < 16
