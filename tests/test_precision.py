"""Training in bf16 on tiny-random: fp32 master weights, the NaN stop, clipping, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from introspect import models, precision
from introspect.data import DataConfig, make_examples, split
from introspect.train import TrainingDiverged, latest_checkpoint, preset, train
from introspect.vectors import VectorSet, random_vectors

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


@pytest.fixture(scope="module")
def data():
    config = DataConfig(n=120, seed=0, magnitudes=[8.0, 16.0], magnitude_mode="absolute")
    return split(make_examples(config, 4, VS), 0.2, seed=0)


def quick(**kw):
    base = dict(lr=1e-3, warmup_steps=2, batch_size=4, eval_every=4, save_every=4, max_steps=8)
    return preset("original", **{**base, **kw})


def bf16():
    return models.load("tiny-random", dtype="bfloat16", device="cpu")


def read(path):
    return json.loads(path.read_text())


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_records_the_dtype(tmp_path, data):
    lm = bf16()
    train(lm, *data, {"random": VS}, quick(), tmp_path / "run")
    trained = {p.dtype for p in lm.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lm.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    config = read(tmp_path / "run" / "config.json")
    assert config["dtype"] == "bfloat16"
    assert config["weights_dtype"] == {"frozen": "bfloat16", "trained": "float32"}
    saved = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert {w.dtype for w in saved.values()} == {torch.float32}
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in log) and log[-1]["val_loss"] > 0


def test_full_finetuning_in_bf16_keeps_fp32_master_weights_and_runs_bf16_matmuls(tmp_path, data):
    lm = bf16()
    start = {k: v.float().clone() for k, v in lm.model.state_dict().items()}
    seen = set()
    layer = models.decoder_layers(lm.model)[0].mlp.down_proj
    layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    train(lm, *data, {"random": VS}, quick(method="full", lr=1e-5), tmp_path / "run")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert seen == {torch.bfloat16}  # autocast: the matmuls ran in bf16
    assert read(tmp_path / "run" / "config.json")["weights_dtype"] == {"trained": "float32"}
    # Updates below bf16's resolution survive: a bf16 master copy would have rounded them away.
    w0, w1 = start["model.layers.0.mlp.down_proj.weight"], layer.weight.detach()
    moved = (w1 - w0).abs()
    rounded = (w1.bfloat16().float() - w0).abs()
    assert (moved > 0).float().mean() > 0.5
    assert bool(((moved > 0) & (rounded == 0)).any())


def test_bf16_resume_is_exact(tmp_path, data):
    train(bf16(), *data, {"random": VS}, quick(), tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_at_6(step, _model):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(bf16(), *data, {"random": VS}, quick(), tmp_path / "killed", on_step=kill_at_6)
    train(bf16(), *data, {"random": VS}, quick(), tmp_path / "killed", resume=True)
    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_nan_stops_with_the_last_good_checkpoint(tmp_path, data):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"step 6: non-finite loss.*step-000004"):
        train(bf16(), *data, {"random": VS}, quick(save_every=2), tmp_path / "run", on_step=poison)
    good = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in good.values())


def test_bf16_clipping_applies_to_the_fp32_gradients(tmp_path, data):
    norms = []

    def after_step(_step, model):  # gradients stay in place until the next step's zero_grad
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert {g.dtype for g in grads} == {torch.float32}
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    train(bf16(), *data, {"random": VS}, quick(max_grad_norm=1e-3), tmp_path, on_step=after_step)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 1e-3 for r in log)  # logged: the norm before clipping
    assert max(norms) == pytest.approx(1e-3, rel=1e-3)  # applied: the norm after


def test_the_default_dtype(monkeypatch):
    assert precision.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(precision, "CPU_BF16_HOLDS", False)
    assert precision.default_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "CPU_BF16_HOLDS", True)
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    assert precision.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    assert precision.default_dtype("cpu") == torch.float32
    assert precision.resolve("float16", "cpu") == torch.float16
