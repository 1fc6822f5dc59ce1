"""`introspect check`: the memory model against a measured step, and the plan verdicts."""

import os
import subprocess
import sys

import pytest
import torch

from introspect import models
from introspect.data import DataConfig, make_examples
from introspect.detection import collate, steered_cache, suffix_logits
from introspect.examples import tokenise_examples, tokenised_prompts
from introspect.memory import TrainShape, arch, train_memory
from introspect.train import prepare_model, preset
from introspect.vectors import VectorSet, random_vectors

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def introspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip


def measured_step(name: str, batch: int = 8):
    """One steer-then-remove training forward on CPU (fp32, LoRA r16 on q,k,v,o, no
    checkpointing): the bytes autograd saves for backward (each storage once, the weights'
    own excluded), the KV cache's bytes, the trainable parameters, and the trial lengths."""
    lm = models.load(name, device="cpu", dtype="float32")
    vs = VectorSet(random_vectors(lm.d_model, 4, 0), name, "random", 2, name="random")
    data = DataConfig(n=batch, seed=0, magnitudes=[0.1], magnitude_mode="relative")
    df = make_examples(data, lm.n_layers, vs, norms=[10.0] * lm.n_layers)
    tokens = tokenise_examples(lm.tokenizer, df)
    prompts = tokenised_prompts(tokens, {"random": vs}, lm.n_layers, lm.d_model)
    model = prepare_model(lm, preset("original", lora_dropout=0.0))
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch_t = collate(prompts, lm.tokenizer.pad_token_id)
    cache = steered_cache(model, batch_t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        suffix_logits(model, batch_t, cache)
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lengths = (batch_t.prefix_ids.shape[1], batch_t.suffix_ids.shape[1])
    return sum(saved.values()), kv, trainable, lengths, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-random", "smollm2-135m"])
def test_the_memory_model_matches_a_measured_step(name):
    """Within 15 % for the activations (measured: -12 % tiny-random, -9 % smollm2), exact for
    the KV cache and the parameter counts."""
    activations, kv, trainable, (tp, ts), n_all = measured_step(name)
    a = arch(name)
    shape = TrainShape(batch=8, prefix=tp, suffix=ts, dtype_bytes=4)
    estimate = train_memory(a, shape)
    assert estimate["kv_cache"] == kv
    assert a.lora_params(list(shape.targets), 16) == trainable
    assert a.n_params + trainable == n_all
    assert abs(estimate["activations"] / activations - 1) < 0.15, (estimate, activations)


def test_checkpointing_keeps_only_the_layer_inputs_and_one_layer():
    a = arch("smollm2-135m")
    plain = train_memory(a, TrainShape(8, 120, 20, checkpointing=False))["activations"]
    ckpt = train_memory(a, TrainShape(8, 120, 20, checkpointing=True))["activations"]
    assert ckpt < plain / 5


def test_shipped_configs_give_the_published_sizes():
    assert arch("Qwen/Qwen2.5-7B-Instruct").n_params == 7_615_616_512
    assert arch("Qwen/Qwen2.5-Coder-32B-Instruct").n_params == 32_763_876_352
    assert arch("Qwen/Qwen2.5-0.5B-Instruct").n_params == 494_032_768
    assert arch("smollm2-135m").n_params == 134_515_008


def test_v2_fits_four_a100s_and_not_24_gb_cards():
    ok = introspect("check", "plans/v2.yaml", "--gpus", "4", "--gpu-memory", "80")
    assert ok.returncode == 0, ok.stderr
    assert "total:" in ok.stdout and "GPU-hours" in ok.stdout
    small = introspect("check", "plans/v2.yaml", "--gpus", "4", "--gpu-memory", "24")
    assert small.returncode == 2
    [line] = small.stderr.strip().splitlines()
    assert line.startswith("error: stages.original: needs ~") and "the GPUs have 24" in line


def test_the_seeds_stance_plan_on_qwen_is_accepted_on_one_gpu():
    r = introspect("check", "plans/stance-qwen.yaml", "--gpus", "1", "--gpu-memory", "80")
    assert r.returncode == 0, r.stderr
    assert "| comparison | stance | 1 GPU |" in r.stdout and "total:" in r.stdout


def test_a_cpu_count_below_cpus_per_worker_is_refused():
    r = introspect("check", "plans/v2.yaml", "--gpus", "4", "--cpus", "2")
    assert r.returncode == 2
    assert "needs 4 CPUs, the cluster has 2; lower resources.cpus_per_worker" in r.stderr


def test_the_quickstart_on_two_cpus():
    r = introspect("check", "plans/quickstart.yaml", "--cpus", "2")
    assert r.returncode == 0, r.stderr
    assert "CPU-hours" in r.stdout and "matmul" in r.stdout
