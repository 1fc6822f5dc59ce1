"""Checks of the science the ModelHost serves, run in one process: log-probs and activations."""

import pytest
import torch

from introspect.activations import last_token_activations, layer_activations
from introspect.errors import IntrospectError
from introspect.logprobs import continuation_logprobs

PROMPTS = ["Hello there.", "What is the capital of France?", "Name a colour."]
CONTS = [" Hi.", " Paris", " Blue, I think."]


def reference_logprob(lm, prompt: str, cont: str, chat: bool = True) -> float:
    """One full forward of prompt + continuation, log-softmax at every continuation position."""
    tok = lm.tokenizer
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ctx = tok.encode(text, add_special_tokens=False)
    else:
        ctx = tok.encode(prompt)
    ids = tok.encode(cont, add_special_tokens=False)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ctx + ids])).logits[0].float()
    steps = logits[len(ctx) - 1 : -1].log_softmax(-1)
    return steps.gather(1, torch.tensor(ids)[:, None]).sum().item()


@pytest.mark.parametrize("chat", [True, False])
def test_continuation_logprobs_equal_a_plain_forward(tiny, chat):
    got = continuation_logprobs(tiny, PROMPTS, CONTS, batch_size=2, chat=chat)
    expected = [reference_logprob(tiny, p, c, chat) for p, c in zip(PROMPTS, CONTS, strict=True)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for v in got)
    # Batching (right padding) does not change a row's value.
    pairs = zip(PROMPTS, CONTS, strict=True)
    alone = [continuation_logprobs(tiny, [p], [c], chat=chat)[0] for p, c in pairs]
    assert got == pytest.approx(alone, abs=1e-5)


def test_continuation_logprobs_refuse_bad_input(tiny):
    with pytest.raises(IntrospectError, match="continuations"):
        continuation_logprobs(tiny, PROMPTS, CONTS[:2])
    with pytest.raises(IntrospectError, match="pair 1"):
        continuation_logprobs(tiny, PROMPTS[:2], [" a", ""])


def test_layer_activations_are_last_token_layer_outputs(tiny):
    acts = layer_activations(tiny, PROMPTS, [1, 3], batch_size=2)
    assert acts.shape == (3, 2, 64) and acts.dtype == "float32"
    for j, layer in enumerate([1, 3]):
        ref = last_token_activations(tiny, PROMPTS, layer).numpy()
        assert abs(acts[:, j] - ref).max() <= 1e-5
    for bad in ([4], [-1], []):
        with pytest.raises(IntrospectError, match="layers"):
            layer_activations(tiny, PROMPTS, bad)
