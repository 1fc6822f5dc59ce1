"""Training in bf16 on tiny-random (fp32 master weights, the NaN stop, clipping, exact resume),
and batches built around a few prefixes that share the prefix pass."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from introspect import models, precision, prefix_share
from introspect import train as T
from introspect.data import DataConfig, make_examples, split
from introspect.detection import DetectionExample, build_prompt, steered_cache
from introspect.errors import IntrospectError
from introspect.train import (
    TrainingDiverged,
    grouped_batch,
    latest_checkpoint,
    prepare_model,
    preset,
    train,
)
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
    monkeypatch.setenv("INTROSPECT_CPU_BF16", "1")
    assert precision.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("INTROSPECT_CPU_BF16", "0")  # what the suite runs under
    assert precision.default_dtype("cpu") == torch.float32
    monkeypatch.delenv("INTROSPECT_CPU_BF16")  # unset: bf16 only where AMX makes it faster
    monkeypatch.setattr(precision, "amx_cpu", lambda: False)  # AVX512-BF16 alone
    assert precision.default_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "amx_cpu", lambda: True)
    assert precision.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "CPU_BF16_HOLDS", False)
    assert precision.default_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "CPU_BF16_HOLDS", True)
    monkeypatch.setenv("INTROSPECT_CPU_BF16", "1")
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)  # AVX2: never bf16
    assert precision.default_dtype("cpu") == torch.float32
    assert precision.resolve("float16", "cpu") == torch.float16


# --------------------------------------------------------------------------- batches by prefix


def few_prefixes(df, n=3):
    """The rows rewritten onto ``n`` contexts and one reply: several steerings per prefix."""
    df = df.copy()
    contexts = sorted(df["context_prompt"].unique())[:n]
    df["context_prompt"] = [contexts[i % n] for i in range(len(df))]
    df["assistant_response"] = df["assistant_response"].iloc[0]
    return df


def test_grouped_batches_take_each_row_once_per_epoch_from_few_prefixes():
    groups = [list(range(0, 10)), list(range(10, 22)), list(range(22, 30))]
    prefix = {i: g for g, rows in enumerate(groups) for i in rows}
    batches = [grouped_batch(groups, 8, 2, seed=1, micro_step=s).tolist() for s in range(3)]
    assert batches == [grouped_batch(groups, 8, 2, seed=1, micro_step=s).tolist() for s in range(3)]
    for b in batches:
        assert len(b) == 8 and len({prefix[i] for i in b}) <= 2
        assert sorted(Counter(prefix[i] for i in b).values()) in ([4, 4], [8])
    # 2 + 3 + 2 chunks of 4: three batches an epoch, no row twice within it.
    assert len(set(sum(batches, []))) == 24
    assert grouped_batch(groups, 8, 2, 1, 3).tolist() != batches[0]  # the next epoch reshuffles
    with pytest.raises(IntrospectError, match="contexts_per_batch"):
        grouped_batch([[0, 1], [2, 3]], 8, 2, 0, 0)
    with pytest.raises(IntrospectError, match="contexts_per_batch: 3 must divide batch_size 8"):
        preset("original", contexts_per_batch=3)


def test_shared_prefix_training_equals_the_plain_path_and_resumes_exactly(
    tmp_path, data, monkeypatch
):
    train_df, val_df = few_prefixes(data[0]), few_prefixes(data[1])
    cfg = quick(contexts_per_batch=2, max_steps=6, save_every=3, eval_every=3)
    lm = models.load("tiny-random", device="cpu")
    train(lm, train_df, val_df, {"random": VS}, cfg, tmp_path / "shared")

    class Killed(Exception):
        pass

    def kill_at_4(step, _model):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(fresh32(), train_df, val_df, {"random": VS}, cfg, tmp_path / "k", on_step=kill_at_4)
    train(fresh32(), train_df, val_df, {"random": VS}, cfg, tmp_path / "k", resume=True)
    # The plain prefix pass; the suffix pass stays packed, so LoRA dropout draws the same.
    monkeypatch.setattr(prefix_share, "shared_cache", steered_cache)
    train(fresh32(), train_df, val_df, {"random": VS}, cfg, tmp_path / "plain")
    shared, resumed, plain = (
        load_file(str(tmp_path / d / "final" / "adapter_model.safetensors"))
        for d in ("shared", "k", "plain")
    )
    assert all(torch.equal(shared[k], resumed[k]) for k in shared)
    assert max(float((shared[k] - plain[k]).abs().max()) for k in shared) <= 1e-4
    assert max(float((shared[k] - fresh_adapter(tmp_path)[k]).abs().max()) for k in shared) > 0


def fresh32():
    return models.load("tiny-random", device="cpu")


def fresh_adapter(tmp_path):
    """An untrained adapter, to show that training moved the weights at all."""
    lm = fresh32()
    prepare_model(lm, quick())
    lm.model.save_pretrained(tmp_path / "untrained")
    return load_file(str(tmp_path / "untrained" / "adapter_model.safetensors"))


@pytest.mark.parametrize("packed", [True, False])
def test_the_prefix_pass_runs_without_dropout(monkeypatch, packed):
    lm = fresh32()
    model = prepare_model(lm, quick(lora_dropout=0.5))
    model.train()
    modes = []
    for name in ("prefix_cache", "packed_cache"):
        real = getattr(T, name)

        def spy(m, *args, real=real):
            modes.append(m.training)
            return real(m, *args)

        monkeypatch.setattr(T, name, spy)
    prompts = [
        build_prompt(lm.tokenizer, DetectionExample("Hello there.", "Hi!", "Steered?"))
        for _ in range(2)
    ]
    T.answer_pair(model, prompts, lm.tokenizer.pad_token_id, packed=packed)
    assert modes == [False] and model.training  # eval for the prefix, train again after
