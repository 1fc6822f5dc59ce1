"""Gradient checkpointing under steer-then-remove: the same loss and gradients as without it."""

import pytest
import torch
import torch.nn.functional as F

from introspect import models
from introspect.data import DataConfig, make_examples
from introspect.examples import tokenise_examples, tokenised_prompts
from introspect.models import decoder_layers
from introspect.train import answer_pair, label_targets, prepare_model, preset
from introspect.vectors import VectorSet, random_vectors


def step(name: str, method: str, checkpointing: bool, rows: int = 6):
    """One training forward/backward: loss, gradients by name, decoder-layer forward calls."""
    lm = models.load(name, device="cpu", dtype="float32")
    vs = VectorSet(random_vectors(lm.d_model, 4, 0), name, "random", 2, name="random")
    data = DataConfig(n=rows, seed=0, magnitudes=[0.2], magnitude_mode="relative")
    norms = [10.0] * lm.n_layers
    df = make_examples(data, lm.n_layers, vs, norms=norms)
    prompts = tokenised_prompts(
        tokenise_examples(lm.tokenizer, df), {"random": vs}, lm.n_layers, lm.d_model
    )
    config = preset(
        "original", method=method, lora_dropout=0.0, gradient_checkpointing=checkpointing
    )
    model = prepare_model(lm, config)
    model.train()
    calls = []
    for layer in decoder_layers(model):  # inside the layer: a replay calls it again
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    pair = answer_pair(model, prompts, lm.tokenizer.pad_token_id)
    loss = F.cross_entropy(pair, label_targets(df["label"].tolist()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(calls), lm.n_layers


@pytest.mark.parametrize(
    "name,method",
    [("tiny-random", "lora"), ("tiny-random", "full"), ("smollm2-135m", "lora"),
     ("smollm2-135m", "full")],
)  # fmt: skip
def test_checkpointed_step_equals_the_plain_step(name, method):
    loss, grads, calls, n_layers = step(name, method, checkpointing=False)
    loss_c, grads_c, calls_c, _ = step(name, method, checkpointing=True)
    # Prefix pass: every MLP but the last layer's (its output feeds nothing); suffix pass: all;
    # under checkpointing the suffix pass's layers below the last replayed in backward.
    assert calls == 2 * n_layers - 1 and calls_c == 3 * n_layers - 2
    assert abs(loss - loss_c) <= 1e-5
    assert grads.keys() == grads_c.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_transformers_checkpointing_would_drop_the_steered_cache(tiny):
    """Why checkpointing is ours: transformers' own drops the cache the suffix pass reads."""
    lm = models.load("tiny-random", device="cpu")
    vs = VectorSet(random_vectors(lm.d_model, 4, 0), "tiny-random", "random", 2, name="random")
    df = make_examples(DataConfig(n=4, magnitudes=[8.0], magnitude_mode="absolute"), 4, vs)
    prompts = tokenised_prompts(tokenise_examples(lm.tokenizer, df), {"random": vs}, 4, 64)
    lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    pad = lm.tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="size of tensor"):
        answer_pair(lm.model, prompts, pad, packed=False).sum().backward()
    with pytest.raises(RuntimeError, match="out of DATA bounds"):  # packed: no prefix keys
        answer_pair(lm.model, prompts, pad).sum().backward()
