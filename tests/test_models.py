"""Checks of introspect.models: the test model, finding decoder layers, and loading."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from introspect.detection import answer_token_ids
from introspect.errors import IntrospectError
from introspect.models import (
    backbone,
    build_tiny_random,
    decoder_layers,
    hidden_size,
    load,
    smollm2_dir,
)
from introspect.steering import Steering, steer


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def token_ids() -> torch.Tensor:
    return torch.randint(10, 5000, (2, 6), generator=torch.Generator().manual_seed(0))


# --- tiny-random ------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_and_leaves_the_global_rng_alone():
    with torch.random.fork_rng():
        torch.manual_seed(12345)  # a state no build would leave behind
        rng = torch.random.get_rng_state()
        a, _ = build_tiny_random()
        b, _ = build_tiny_random()
        assert torch.equal(torch.random.get_rng_state(), rng)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other, _ = build_tiny_random(seed=1)
    assert not torch.equal(other.state_dict()["lm_head.weight"], sa["lm_head.weight"])


def test_tiny_random_shape_and_chat_template(tiny):
    assert tiny.n_layers == 4
    assert tiny.d_model == 64
    assert tiny.name == "tiny-random"
    assert not tiny.model.training
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert "<|im_start|>" in tiny.tokenizer.chat_template
    text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert tiny.tokenizer.pad_token_id is not None


def test_fixture_weights_equal_a_fresh_build(tiny):
    fresh, _ = build_tiny_random()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.model(token_ids()).logits, fresh(token_ids()).logits, atol=0, rtol=0
        )


# --- decoder layers ---------------------------------------------------------------------------


def test_decoder_layers_of_a_plain_model(tiny):
    layers = decoder_layers(tiny.model)
    assert layers is tiny.model.model.layers
    assert len(layers) == 4
    assert backbone(tiny.model) is tiny.model.model
    assert hidden_size(tiny.model) == 64


@pytest.fixture
def peft_tiny():
    """A fresh tiny model (the session fixture stays unwrapped) with LoRA on q and v."""
    model, _ = build_tiny_random()
    model.eval()
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2)
    return get_peft_model(model, config).eval()


def test_decoder_layers_are_found_through_a_peft_wrapper(peft_tiny):
    layers = decoder_layers(peft_tiny)
    assert layers is peft_tiny.get_base_model().model.layers
    assert len(layers) == 4
    assert hidden_size(peft_tiny) == 64
    assert any("lora_A" in name for name, _ in layers[0].named_modules())


def test_steering_works_through_a_peft_wrapper(peft_tiny, tiny):
    s = Steering(unit(64, 1), 1, 3, 10.0)
    with torch.no_grad():
        plain = peft_tiny(token_ids()).logits
        with steer(peft_tiny, s):
            steered = peft_tiny(token_ids()).logits
        after = peft_tiny(token_ids()).logits
        # LoRA starts as the identity (B = 0), so the wrapped model steers like the bare one.
        with steer(tiny.model, s):
            bare = tiny.model(token_ids()).logits
    assert (steered - plain).abs().max() > 1e-2
    assert torch.equal(after, plain)
    torch.testing.assert_close(steered, bare, atol=1e-5, rtol=0)


# --- loading ----------------------------------------------------------------------------------


def test_an_unknown_model_raises_introspect_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IntrospectError, match="model"):
        load("/nonexistent/model-dir", device="cpu")


def test_a_missing_adapter_directory_raises_introspect_error():
    with pytest.raises(IntrospectError, match="adapter"):
        load("tiny-random", device="cpu", adapter="/nonexistent/adapter-dir")


@pytest.mark.slow
def test_smollm2_loads_from_the_converted_cache(smollm):
    directory = smollm2_dir()
    assert (directory / "config.json").is_file()
    assert (directory / "model.safetensors").is_file()
    assert not [p for p in directory.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
    assert smollm.n_layers == 30
    assert smollm.d_model == 576
    n_params = sum(p.numel() for p in smollm.model.parameters())
    assert 130e6 < n_params < 140e6
    assert next(smollm.model.parameters()).dtype == torch.float32
    tok = smollm.tokenizer
    for word in (" yes", " no"):
        (token,) = tok.encode(word, add_special_tokens=False)
        assert tok.decode([token]) == word
    yes, no = answer_token_ids(tok)
    assert yes != no
