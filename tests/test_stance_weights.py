"""Weight-change analysis and selective layer checkpoints, on tiny-random and hand-made tensors."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from introspect.errors import IntrospectError
from introspect.models import build_tiny_random
from introspect.stance.layer_checkpoints import (
    apply_layer_checkpoints,
    load_layer_checkpoint,
    next_token_kl,
    save_layer_checkpoint,
)
from introspect.stance.weights import analyse, delta_stats, linear_deltas, write_analysis

# Relative changes the fine-tune simulation makes, largest first.
PERTURBED = {
    "model.layers.1.mlp.down_proj": 0.30,
    "model.layers.2.self_attn.k_proj": 0.10,
    "model.layers.0.self_attn.o_proj": 0.02,
}


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_random()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tuned(tiny):
    """A copy of tiny-random with three weight matrices moved by known relative amounts."""
    model = copy.deepcopy(tiny[0])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, rel in PERTURBED.items():
            w = model.get_submodule(name).weight
            noise = torch.randn(w.shape, generator=g)
            w.add_(noise * (rel * w.norm() / noise.norm()))
    return model


def tokens(tokenizer, n=3, length=12):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, len(tokenizer), (n, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- statistics


def test_rank_one_delta_has_stable_and_effective_rank_one():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(48, generator=g, dtype=torch.float64)
    v = torch.randn(32, generator=g, dtype=torch.float64)
    weight = torch.randn(48, 32, generator=g)
    for dtype in (torch.float64, torch.float32):  # float32 round-off must not add rank
        s = delta_stats(torch.outer(u, v).to(dtype), weight)
        assert s["stable_rank"] == pytest.approx(1.0, abs=1e-6)
        assert s["effective_rank"] == pytest.approx(1.0, abs=1e-6)
        assert s["numerical_rank"] == 1
        assert s["spectral"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)


def test_scaled_identity_has_full_stable_and_effective_rank():
    n, c = 16, 0.37
    s = delta_stats(c * torch.eye(n), torch.randn(n, n))
    assert s["stable_rank"] == pytest.approx(n, rel=1e-9)
    assert s["effective_rank"] == pytest.approx(n, rel=1e-9)
    assert s["numerical_rank"] == n
    assert s["spectral"] == pytest.approx(c, rel=1e-6)
    assert s["frobenius"] == pytest.approx(c * math.sqrt(n), rel=1e-6)


def test_stats_match_numpy_on_a_random_delta():
    rng = np.random.default_rng(1)
    d, w = rng.normal(size=(20, 12)), rng.normal(size=(20, 12))
    s = delta_stats(torch.from_numpy(d), torch.from_numpy(w))
    sigma = np.linalg.svd(d, compute_uv=False)
    p = sigma / sigma.sum()
    assert s["frobenius"] == pytest.approx(np.sqrt((d**2).sum()), rel=1e-12)
    assert s["relative"] == pytest.approx(np.sqrt((d**2).sum() / (w**2).sum()), rel=1e-12)
    assert s["spectral"] == pytest.approx(sigma.max(), rel=1e-12)
    assert s["stable_rank"] == pytest.approx((d**2).sum() / sigma.max() ** 2, rel=1e-12)
    assert s["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert 1 < s["stable_rank"] < s["effective_rank"] < 12  # a generic matrix: spread spectrum
    assert s["numerical_rank"] == 12


def test_zero_delta_gives_zeros_not_nan():
    s = delta_stats(torch.zeros(8, 4), torch.randn(8, 4))
    assert s == {k: 0 for k in s}
    assert all(not math.isnan(v) for v in s.values())


def test_delta_shape_must_match_weight():
    with pytest.raises(IntrospectError, match="shape"):
        delta_stats(torch.zeros(8, 4), torch.zeros(4, 8))


# --------------------------------------------------------------------------- deltas


def test_lora_delta_equals_merged_minus_base_and_has_rank_at_most_r(tiny):
    base = tiny[0]
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    g = torch.Generator().manual_seed(5)
    lora_layers = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_B"):
            lora_layers[name] = module
            with torch.no_grad():
                module.lora_B["default"].weight.copy_(
                    torch.randn(module.lora_B["default"].weight.shape, generator=g)
                )
    assert {m.scaling["default"] for m in lora_layers.values()} != {1.0}  # scaling is tested

    deltas = linear_deltas(base, peft_model)
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")}
    assert set(deltas) == expected == set(lora_layers)
    # Not merged in place: the wrapped weights are still the base's.
    for name, module in lora_layers.items():
        assert not module.merged
        assert torch.equal(module.base_layer.weight, base.get_submodule(name).weight)

    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, delta in deltas.items():
        want = merged.get_submodule(name).weight - base.get_submodule(name).weight
        assert torch.allclose(delta, want, atol=1e-6), name
        assert torch.linalg.matrix_rank(delta) <= 2  # float32 delta: float32 tolerance
        assert delta_stats(delta, base.get_submodule(name).weight)["numerical_rank"] <= 2

    df = analyse(base, peft_model)
    assert set(df["module"]) == expected
    assert (df["effective_rank"] <= 2 + 1e-9).all() and (df["stable_rank"] <= 2 + 1e-9).all()
    with peft_model.disable_adapter():
        assert linear_deltas(base, peft_model) == {}


def test_full_finetune_deltas_are_found_and_ranked(tiny, tuned):
    base = tiny[0]
    df = analyse(base, tuned)
    assert list(df["module"]) == list(PERTURBED)  # exactly those, largest relative first
    assert list(df["rank"]) == [1, 2, 3]
    assert df["relative"].to_numpy() == pytest.approx(list(PERTURBED.values()), rel=1e-4)
    assert list(df["layer"]) == [1, 2, 0]
    assert list(df["kind"]) == ["down_proj", "k_proj", "o_proj"]
    w = base.get_submodule("model.layers.1.mlp.down_proj").weight
    assert df.loc[0, "params"] == w.numel()
    # Full-rank noise, unlike LoRA.
    assert (df["numerical_rank"] == [min(s) for s in (w.shape, (32, 64), (64, 64))]).all()

    everything = analyse(base, tuned, include_zero=True)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in base.modules())
    assert len(everything) == n_linear
    assert (everything["relative"].iloc[3:] == 0).all()
    assert everything["relative"].notna().all()


def test_models_with_different_modules_are_refused(tiny):
    base = tiny[0]
    other, _ = build_tiny_random(n_layers=2)
    with pytest.raises(IntrospectError, match="layers.2"):
        linear_deltas(base, other)


def test_write_analysis_json_and_heatmap(tiny, tuned, tmp_path):
    df = analyse(tiny[0], tuned, include_zero=True)
    paths = write_analysis(df, tmp_path, "tiny-random: perturbed copy")
    records = json.loads(paths["json"].read_text())
    assert len(records) == len(df)
    assert records[0]["module"] == "model.layers.1.mlp.down_proj"
    assert records[0]["relative"] == pytest.approx(0.30, rel=1e-4)
    assert records[0]["layer"] == 1
    assert next(r for r in records if r["module"] == "lm_head")["layer"] is None
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "weight_changes.json",
        "weight_changes.png",
    ]


# --------------------------------------------------------------------------- layer checkpoints


def test_checkpoint_of_all_modules_reproduces_the_tuned_model(tiny, tuned, tmp_path):
    base, tokenizer = tiny
    deltas = linear_deltas(base, tuned)
    df = analyse(base, tuned)
    manifest = save_layer_checkpoint(deltas, df, None, tmp_path / "ckpt", "tiny-random")
    assert [m["name"] for m in manifest["modules"]] == list(PERTURBED)
    assert manifest["base_model"] == "tiny-random" and manifest["k"] is None
    assert manifest["total_bytes"] == (tmp_path / "ckpt" / "deltas.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left over

    loaded_manifest, loaded = load_layer_checkpoint(tmp_path / "ckpt")
    assert loaded_manifest == manifest
    assert all(torch.equal(loaded[n], deltas[n]) for n in deltas)

    model = copy.deepcopy(base)
    ids = tokens(tokenizer)
    assert (logits(model, ids) - logits(tuned, ids)).abs().max() > 1e-3  # the test can fail
    changed = apply_layer_checkpoints(model, [(tmp_path / "ckpt", 1.0)], base_model="tiny-random")
    assert sorted(changed) == sorted(PERTURBED)
    assert (logits(model, ids) - logits(tuned, ids)).abs().max() <= 1e-6


def test_checkpoint_with_k_one_changes_only_the_top_module(tiny, tuned, tmp_path):
    base = tiny[0]
    manifest = save_layer_checkpoint(
        linear_deltas(base, tuned), analyse(base, tuned), 1, tmp_path / "top1", "tiny-random"
    )
    assert [m["name"] for m in manifest["modules"]] == ["model.layers.1.mlp.down_proj"]
    model = copy.deepcopy(base)
    apply_layer_checkpoints(model, [(tmp_path / "top1", 1.0)])
    before, after = weights_of(base), weights_of(model)
    differ = [n for n in before if not torch.equal(before[n], after[n])]
    assert differ == ["model.layers.1.mlp.down_proj.weight"]
    top = "model.layers.1.mlp.down_proj"
    diff = model.get_submodule(top).weight - tuned.get_submodule(top).weight
    assert diff.abs().max() <= 1e-6


def test_composing_half_and_half_equals_applying_once(tiny, tuned, tmp_path):
    base = tiny[0]
    save_layer_checkpoint(
        linear_deltas(base, tuned), analyse(base, tuned), None, tmp_path / "c", "tiny-random"
    )
    once, halves, scaled = (copy.deepcopy(base) for _ in range(3))
    apply_layer_checkpoints(once, [(tmp_path / "c", 1.0)])
    loaded = load_layer_checkpoint(tmp_path / "c")
    apply_layer_checkpoints(halves, [(tmp_path / "c", 0.5), (loaded, 0.5)])
    a, b = weights_of(once), weights_of(halves)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # A different weight really does something different.
    apply_layer_checkpoints(scaled, [(loaded, 0.25)])
    c = weights_of(scaled)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_apply_errors_name_the_problem_and_leave_the_model_untouched(tiny, tuned, tmp_path):
    base = tiny[0]
    deltas = linear_deltas(base, tuned)
    manifest = save_layer_checkpoint(deltas, analyse(base, tuned), None, tmp_path / "c", "tiny")
    good = (manifest, deltas)
    model = copy.deepcopy(base)
    before = weights_of(model)

    bad_shape = copy.deepcopy(good)
    bad_shape[1]["model.layers.2.self_attn.k_proj"] = torch.zeros(3, 3)
    with pytest.raises(IntrospectError, match=r"model\.layers\.2\.self_attn\.k_proj.*shape"):
        apply_layer_checkpoints(model, [(good, 1.0), (bad_shape, 1.0)])

    missing = copy.deepcopy(good)
    missing[1]["model.layers.9.mlp.up_proj"] = torch.zeros(128, 64)
    with pytest.raises(IntrospectError, match=r"model\.layers\.9\.mlp\.up_proj"):
        apply_layer_checkpoints(model, [(good, 1.0), (missing, 1.0)])

    with pytest.raises(IntrospectError, match="'tiny'.*'smollm2-135m'"):
        apply_layer_checkpoints(model, [(tmp_path / "c", 1.0)], base_model="smollm2-135m")

    after = weights_of(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_load_refuses_missing_corrupt_or_inconsistent_checkpoints(tiny, tuned, tmp_path):
    base = tiny[0]
    deltas = linear_deltas(base, tuned)
    df = analyse(base, tuned)
    with pytest.raises(IntrospectError, match="not a directory"):
        load_layer_checkpoint(tmp_path / "nope")

    path = tmp_path / "c"
    save_layer_checkpoint(deltas, df, None, path, "tiny-random")
    (path / "deltas.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IntrospectError, match="not a readable safetensors"):
        load_layer_checkpoint(path)

    save_layer_checkpoint(deltas, df, None, path, "tiny-random")  # replaces the damaged one
    load_layer_checkpoint(path)
    save_file(
        {k: v for k, v in deltas.items() if k != "model.layers.0.self_attn.o_proj"},
        str(path / "deltas.safetensors"),
    )
    with pytest.raises(IntrospectError, match="model.layers.0.self_attn.o_proj"):
        load_layer_checkpoint(path)

    save_layer_checkpoint(deltas, df, None, path, "tiny-random")
    (path / "manifest.json").write_text("{")
    with pytest.raises(IntrospectError, match="not valid JSON"):
        load_layer_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(IntrospectError, match="manifest.json is missing"):
        load_layer_checkpoint(path)

    with pytest.raises(IntrospectError, match="k: 0"):
        save_layer_checkpoint(deltas, df, 0, tmp_path / "k0", "tiny-random")


def test_next_token_kl_is_zero_for_the_same_model_and_positive_for_a_changed_one(tiny, tuned):
    base, tokenizer = tiny
    prompts = ["What is the capital of France?", "Are you conscious?"]
    assert next_token_kl(base, base, tokenizer, prompts) == 0.0
    kl = next_token_kl(base, tuned, tokenizer, prompts)
    assert kl > 0

    # Independently: pooled over all positions of both prompts.
    terms = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])
        lp = torch.log_softmax(logits(base, ids)[0].double(), -1)
        lq = torch.log_softmax(logits(tuned, ids)[0].double(), -1)
        terms.append(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
    assert kl == pytest.approx(float(torch.cat(terms).mean()), rel=1e-9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "stages.s.config.run: required"),
        ({"run": "r", "top": 0}, "stages.s.config.top: 0: Input should be greater than or equal"),
        ({"run": "r", "top": "5"}, "stages.s.config.top: '5': Input should be a valid integer"),
        ({"run": "r", "bsae": "tiny-random"}, "stages.s.config.bsae: unknown key"),
    ],
)
def test_weights_config_errors_name_the_field(data, message):
    from introspect.config import parse
    from introspect.stance.weights import StanceWeightsConfig

    with pytest.raises(IntrospectError) as e:
        parse(StanceWeightsConfig, data, "stages.s.config")
    assert str(e.value).startswith(message)
