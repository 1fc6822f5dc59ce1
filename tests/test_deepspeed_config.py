"""The ZeRO-3 memory plan and config: arithmetic against hand-computed numbers, field errors."""

import pytest

from introspect.errors import IntrospectError
from pipelines.deepspeed_config import (
    GIB,
    ModelSize,
    deepspeed_config,
    gpu_need,
    memory_plan,
    model_size,
)

QWEN_7B = dict(  # Qwen/Qwen2.5-7B config.json
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
QWEN_32B = dict(  # Qwen/Qwen2.5-Coder-32B config.json
    QWEN_7B,
    hidden_size=5120,
    intermediate_size=27648,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
)


def flat(n_params: float) -> ModelSize:
    """A model with no gathered-layer term, so per-GPU numbers are bytes/param × P / N."""
    return ModelSize(int(n_params), 4096, 0)


def test_parameter_counts_match_the_published_models(tiny):
    assert model_size(QWEN_7B).n_params == 7_615_616_512
    assert model_size(QWEN_32B).n_params == 32_763_876_352
    # A real model: tiny-random (Llama, tied embeddings) counted by torch.
    config = tiny.model.config
    assert model_size(config).n_params == sum(p.numel() for p in tiny.model.parameters())
    assert model_size(config).largest_layer == config.vocab_size * config.hidden_size


def test_32b_on_four_80gb_gpus_offloads_the_optimizer():
    plan = memory_plan(flat(32e9), num_gpus=4, gpu_gib=80)
    # 18 bytes/param sharded: 18 × 32e9 / 4 = 144e9 bytes = 134.1 GiB > 60 GiB (80 less 25%).
    assert plan.per_offload["none"] == pytest.approx(144e9 / GIB)
    assert round(plan.per_offload["none"], 3) == 134.110
    # The bf16 weight shard alone: 2 × 32e9 / 4 = 16e9 bytes = 14.9 GiB.
    assert plan.offload == "optimizer"
    assert plan.gpu_gib == pytest.approx(16e9 / GIB)
    assert round(plan.gpu_gib, 3) == 14.901
    assert plan.budget_gib == 60
    # Host: fp32 grads + master + m + v (16 bytes) for the whole model on this node, × 1.5.
    assert plan.cpu_gib == pytest.approx(16 * 32e9 * 1.5 / GIB)


def test_7b_on_one_80gb_gpu_offloads_the_optimizer_and_135m_fits_as_is():
    plan = memory_plan(flat(7e9), num_gpus=1, gpu_gib=80)
    assert plan.per_offload["none"] == pytest.approx(126e9 / GIB)  # 117.3 GiB
    assert (plan.offload, plan.gpu_gib) == ("optimizer", pytest.approx(14e9 / GIB))  # 13.0
    small = memory_plan(flat(135e6), num_gpus=1, gpu_gib=80)
    assert (small.offload, small.gpu_gib) == ("none", pytest.approx(2.43e9 / GIB))  # 2.26


def test_the_gathered_layer_is_added_whole_and_float32_costs_more():
    size = ModelSize(7_000_000_000, 4096, 500_000_000)
    # bf16: 4 bytes (weights + gradients) for each parameter of the largest layer.
    assert gpu_need(size, "optimizer+params", 1) == pytest.approx(2e9 / GIB)
    assert gpu_need(size, "none", 2) == pytest.approx((18 * 7e9 / 2 + 2e9) / GIB)
    assert gpu_need(size, "none", 2, weight_bytes=4) == pytest.approx((20 * 7e9 / 2 + 4e9) / GIB)


def test_real_models_and_deepspeeds_own_estimator_agree():
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    size = model_size(QWEN_32B)
    for gpus in (1, 4, 8):
        for offload, flags in [("none", (False, False)), ("optimizer", (True, False))]:
            _, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
                size.n_params, size.largest_layer, gpus, 1, *flags
            )
            assert gpu_need(size, offload, gpus) == pytest.approx(gpu / GIB, rel=1e-6)
    assert [memory_plan(size, n, 80).offload for n in (1, 4, 8)] == [
        "optimizer+params",
        "optimizer",
        "optimizer",
    ]
    seven = model_size(QWEN_7B)
    assert [memory_plan(seven, n, 80).offload for n in (1, 4, 8)] == [
        "optimizer",
        "none",
        "none",
    ]


def test_what_does_not_fit_is_named():
    with pytest.raises(IntrospectError, match=r"^offload: .*134\.1 GiB per GPU .*'none'"):
        memory_plan(flat(32e9), num_gpus=4, gpu_gib=80, offload="none")
    # Even with everything offloaded a GPU holds the largest layer gathered: 4 GB here.
    with pytest.raises(IntrospectError, match=r"^gpu_gib: "):
        memory_plan(ModelSize(32_000_000_000, 5120, 1_000_000_000), num_gpus=8, gpu_gib=4)
    with pytest.raises(IntrospectError, match=r"^cpu_gib: .*'optimizer\+params'"):
        memory_plan(flat(32e9), num_gpus=4, gpu_gib=80, cpu_gib=64)
    bad = [
        (dict(offload="gpu"), "offload"),
        (dict(num_gpus=0), "num_gpus"),
        (dict(gpu_gib=0), "gpu_gib"),
        (dict(dtype="float16"), "dtype"),
        (dict(headroom=1.0), "headroom"),
    ]
    for kwargs, field in bad:
        with pytest.raises(IntrospectError, match=rf"^{field}: "):
            memory_plan(flat(1e9), **{"num_gpus": 1, "gpu_gib": 80, **kwargs})
    with pytest.raises(IntrospectError, match=r"^model config: "):
        model_size({"hidden_size": 64})


def test_config_follows_hidden_size_batch_and_offload():
    size = model_size(QWEN_32B)
    common = dict(micro_batch=2, grad_accum=4, lr=1e-5, weight_decay=0.1, max_grad_norm=0.5)
    cfg = deepspeed_config(size, 4, offload="optimizer", **common)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 5120 * 5120
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 5120 * 5120)
    assert zero["stage3_param_persistence_threshold"] == 51200
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert cfg["train_batch_size"] == 2 * 4 * 4 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    params = cfg["optimizer"]["params"]
    assert params["lr"] == 1e-5 and params["weight_decay"] == 0.1
    assert params["torch_adam"] is False  # offloaded: DeepSpeed's CPU Adam
    both = deepspeed_config(size, 4, offload="optimizer+params", dtype="float32", **common)
    assert both["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert both["bf16"] == {"enabled": False}
    plain = deepspeed_config(size, 4, **common)
    assert "offload_optimizer" not in plain["zero_optimization"]
    assert plain["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(IntrospectError, match=r"^offload: "):
        deepspeed_config(size, 4, offload="auto", **common)
    with pytest.raises(IntrospectError, match=r"^micro_batch: "):
        deepspeed_config(size, 4, **{**common, "micro_batch": 0})


def test_jobs_choose_zero3_for_full_finetuning_on_gpus_and_name_bad_fields():
    from introspect.train import preset
    from pipelines.train_job import TrainJob

    def job(method="full", **kw):
        return TrainJob("t", "tiny-random", "a", "b", [], preset("original", method=method), **kw)

    assert job(use_gpu=True).uses_deepspeed() is True
    assert job().uses_deepspeed() is False  # CPU: DDP over gloo unless asked
    assert job(deepspeed=True).uses_deepspeed() is True
    assert job("lora", use_gpu=True).uses_deepspeed() is False
    for kwargs, field in [
        (dict(method="lora", deepspeed=True), "deepspeed"),
        (dict(offload="disk"), "offload"),
        (dict(deepspeed=True, offload="optimizer"), "offload"),  # offloading needs a GPU
    ]:
        with pytest.raises(IntrospectError, match=rf"^{field}: "):
            job(**kwargs).uses_deepspeed()


def test_a_zero3_step_is_not_read_as_plain_trainable_weights(tmp_path, tiny):
    from introspect.checkpoints import load_trainable

    (tmp_path / "step-000004" / "zero").mkdir(parents=True)
    with pytest.raises(IntrospectError, match=r"^checkpoint: .*ZeRO-3 shards.*final/"):
        load_trainable(tmp_path / "step-000004", tiny.model)
