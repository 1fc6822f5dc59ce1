"""prefix_grad: the two-pass step with autograd through the steered prefix has the gradient of
one plain pass over prefix + suffix with the steering on the prefix's positions only."""

import torch

from introspect import models
from introspect.data import DataConfig, make_examples
from introspect.examples import tokenise_examples, tokenised_prompts
from introspect.models import causal_lm
from introspect.steering import position_mask, steer
from introspect.train import answer_pair, prepare_model, preset
from introspect.vectors import VectorSet, random_vectors


def _setup():
    lm = models.load("tiny-random", device="cpu", dtype="float32")
    vs = VectorSet(random_vectors(lm.d_model, 4, 0), "tiny-random", "random", 2, name="random")
    df = make_examples(DataConfig(n=2, magnitudes=[8.0], magnitude_mode="absolute"), 4, vs)
    prompts = tokenised_prompts(tokenise_examples(lm.tokenizer, df), {"random": vs}, 4, 64)
    model = prepare_model(lm, preset("original", lora_dropout=0.0))
    model.train()
    return lm, model, [p for p in prompts if p.steering is not None][:1]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prefix_grad_equals_one_pass_and_differs_from_the_cut_graph():
    lm, model, [p] = _setup()
    pad = lm.tokenizer.pad_token_id
    answer_pair(model, [p], pad, prefix_grad=True)[0, 0].backward()
    two_pass = _grads(model)
    model.zero_grad()
    answer_pair(model, [p], pad)[0, 0].backward()
    cut = _grads(model)
    model.zero_grad()

    ids = torch.tensor([p.prefix_ids + p.suffix_ids])
    mask = position_mask([p.steering], [len(p.prefix_ids)], len(p.prefix_ids))
    mask = torch.cat([mask, torch.zeros(1, len(p.suffix_ids))], 1)  # the suffix is not steered
    with steer(model, [p.steering], mask=mask):
        logits = causal_lm(model)(input_ids=ids).logits[0, -1].float()
    logits.log_softmax(-1)[p.answer_ids[0]].backward()
    one_pass = _grads(model)

    assert two_pass.keys() == one_pass.keys() and two_pass
    for n in one_pass:
        torch.testing.assert_close(two_pass[n], one_pass[n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(not torch.allclose(cut[n], one_pass[n], atol=1e-6) for n in cut)
