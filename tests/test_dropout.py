"""BitsDropout: the same distribution as nn.Dropout (up to p's 1/65536 quantisation), from
torch's generator, swapped into LoRA layers on a CPU."""

import math

import pytest
import torch
from torch import nn

from introspect import models
from introspect.dropout import BitsDropout, use_bits_dropout
from introspect.train import prepare_model, preset


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_rate_and_scale_match_the_textbook_dropout(p):
    torch.manual_seed(0)
    layer = BitsDropout(p).train()
    assert abs(layer.p - p) <= 2**-17  # p rounded to the nearest 1/65536
    n = 1_000_000
    out = layer(torch.ones(n))
    kept = out != 0
    # The keep rate within 5 standard deviations of Binomial(n, 1 - p)'s mean.
    assert abs(float(kept.float().mean()) - (1 - layer.p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - layer.p)))


def test_masks_are_independent_across_positions_and_calls():
    torch.manual_seed(1)
    layer = BitsDropout(0.5).train()
    a, b = layer(torch.ones(200_000)) != 0, layer(torch.ones(200_000)) != 0
    # Neighbouring elements (same 64-bit draw) and two calls agree half the time, as independent
    # fair coins do; a shared or shifted mask would agree far more often.
    for x, y in ((a[:-1], a[1:]), (a[0::4], a[3::4]), (a, b)):
        assert abs(float((x == y).float().mean()) - 0.5) < 0.01


def test_the_generator_state_gives_back_the_mask_and_eval_is_identity():
    layer, x = BitsDropout(0.1).train(), torch.randn(3, 7, 5)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)  # what resume and recomputation rely on
    assert layer.eval()(x) is x
    assert BitsDropout(0.0).train()(x) is x


def test_gradient_is_the_mask_times_the_scale():
    layer = BitsDropout(0.2).train()
    x = torch.randn(4, 33, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    expect = (out != 0).float() * layer.scale
    assert torch.allclose(x.grad, expect)


def test_bad_p_is_refused():
    with pytest.raises(ValueError, match="p: 1.0"):
        BitsDropout(1.0)


def test_lora_training_on_a_cpu_uses_it_for_every_adapted_module():
    lm = models.load("tiny-random", device="cpu")
    model = prepare_model(lm, preset("original"))
    drops = [m for m in model.modules() if isinstance(m, BitsDropout)]
    assert len(drops) == 4 * lm.n_layers  # q, k, v, o in every layer
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert use_bits_dropout(model) == 0  # nothing left to swap
