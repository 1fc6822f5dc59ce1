"""The shared prefix pass (introspect.prefix_share) against the plain steered prefix pass."""

import copy
import dataclasses

import pytest
import torch

from introspect import prefix_share
from introspect.detection import (
    DetectionExample,
    answer_probabilities,
    build_prompt,
    collate,
    detection_logits,
    prefix_cache,
    score_detection,
    steered_cache,
    suffix_hidden,
    suffix_logits,
)
from introspect.errors import IntrospectError
from introspect.models import decoder_layers
from introspect.prefix_share import distinct_prefixes, shared_cache, supported
from introspect.steering import Steering

QUESTIONS = ("Do you detect an injected thought?", "Is anything unusual? Answer yes or no.")
CONTEXTS = [
    ("Hi", "Hello!"),
    ("Tell me about cats.", "Cats are small, curious animals."),
    ("Write a long poem about the sea, the wind and the stars over the harbour.", "Here it is."),
    ("What is 2 + 2?", "4."),  # four prefixes: enough for their shared head (MIN_PREFIXES)
]


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def mixed_rows(n_layers: int, d_model: int, contexts=CONTEXTS) -> list[DetectionExample]:
    """Each context with two unsteered twins (two questions) and steerings that differ in layer
    range, magnitude, vector and token slice; contexts differ in length."""
    mid = n_layers // 2
    ranges = [(0, 1, 30.0, None), (1, n_layers, 12.0, None), (mid, n_layers, 50.0, (2, 9)),
              (mid, mid + 1, 20.0, None), (n_layers - 1, n_layers, 80.0, None)]  # fmt: skip
    rows = []
    for c, (context, reply) in enumerate(contexts):
        rows += [DetectionExample(context, reply, q) for q in QUESTIONS]
        for k, (start, end, magnitude, positions) in enumerate(ranges):
            s = Steering(unit(d_model, 10 * c + k), start, end, magnitude, positions)
            rows.append(DetectionExample(context, reply, QUESTIONS[k % 2], steering=s))
    return rows


def batch_of(lm, rows):
    return collate([build_prompt(lm.tokenizer, r) for r in rows], lm.tokenizer.pad_token_id)


def real_tokens(states: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, T, D]`` states at the real tokens (``real``: ``[B, T]``), or all of them."""
    return states if real is None else states.transpose(1, 2)[real.bool()]


def assert_same_cache(a, b, atol=1e-5, real=None):
    """Equal keys and values, at the real tokens where ``real`` (a prefix mask) is given: a
    shared head leaves other numbers at the padding, which every later pass masks."""
    assert len(a.layers) == len(b.layers)
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert x.keys.shape == y.keys.shape, i
        for name in ("keys", "values"):
            mine, theirs = (real_tokens(getattr(c, name), real) for c in (x, y))
            torch.testing.assert_close(mine, theirs, atol=atol, rtol=0, msg=f"layer {i} {name}")


def cache_gap(a, b, real) -> float:
    return max(
        float((real_tokens(x.keys, real) - real_tokens(y.keys, real)).abs().max())
        for x, y in zip(a.layers, b.layers, strict=True)
    )


def test_the_shared_cache_equals_the_plain_one_at_every_layer(tiny):
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    assert len(distinct_prefixes(batch)[0]) == len(CONTEXTS)
    assert prefix_share.shared_head(batch, distinct_prefixes(batch)[0]) >= prefix_share.MIN_HEAD
    shared, plain = shared_cache(tiny.model, batch), steered_cache(tiny.model, batch)
    assert_same_cache(shared, plain, real=batch.prefix_mask)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_shared_scores_equal_plain_scores_in_input_order(tiny, batch_size):
    rows = mixed_rows(tiny.n_layers, tiny.d_model)
    rows = rows[::2] + rows[1::2]  # one context's rows are not side by side in the input
    shared = score_detection(tiny.model, tiny.tokenizer, rows, batch_size)
    plain = score_detection(tiny.model, tiny.tokenizer, rows, batch_size, share_prefixes=False)
    assert shared.p_yes == pytest.approx(plain.p_yes, abs=1e-4)
    assert shared.yes_no_mass == pytest.approx(plain.yes_no_mass, abs=1e-4)
    # The steerings matter here, so equal scores are not just unsteered twins agreeing.
    assert len({round(p, 4) for p in plain.p_yes}) > len(CONTEXTS) * len(QUESTIONS)


def test_shared_logits_equal_plain_logits(tiny):
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    with torch.no_grad():
        shared = detection_logits(tiny.model, batch, share_prefixes=True)
        plain = detection_logits(tiny.model, batch)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=0)


def test_leaving_the_prefix_a_layer_late_is_caught_and_early_is_only_slower(tiny, monkeypatch):
    """The test can fail: a row that leaves its prefix stream after its first steered layer
    misses that layer's steering, and the caches differ. Leaving earlier is still exact."""
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    plain = steered_cache(tiny.model, batch)
    right = prefix_share.leave_layers

    def late(steerings, n_layers):
        return [min(x + 1, n_layers) for x in right(steerings, n_layers)]

    def early(steerings, n_layers):
        return [max(x - 1, 0) for x in right(steerings, n_layers)]

    monkeypatch.setattr(prefix_share, "leave_layers", late)
    assert cache_gap(shared_cache(tiny.model, batch), plain, batch.prefix_mask) > 1e-2
    monkeypatch.setattr(prefix_share, "leave_layers", early)
    assert_same_cache(shared_cache(tiny.model, batch), plain, real=batch.prefix_mask)


def rows_per_layer(model, run, part: str = "self_attn", tokens: bool = False) -> list[int]:
    """Rows (batch entries; ``tokens``: tokens) each decoder layer's ``part`` (its attention or
    its MLP) takes in ``run()``: the last layer runs its parts alone (prefix_share.last_layer)."""
    seen = [0] * len(decoder_layers(model))

    def count(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] += hidden.shape[:-1].numel() if tokens else hidden.shape[0]

        return hook

    handles = [
        getattr(layer, part).register_forward_pre_hook(count(i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_each_prefix_runs_once_through_its_rows_first_steered_layers(tiny):
    """Rows per layer: one prefix, unsteered + steered from layer 1 + from layer 2. A steered
    row's first steered layer is its prefix's, plus the steering."""
    n, d = tiny.n_layers, tiny.d_model
    rows = [DetectionExample("Hi", "Hello!", QUESTIONS[0])]
    rows += [dataclasses.replace(rows[0], steering=Steering(unit(d, k), k, n, 9.0)) for k in (1, 2)]
    batch = batch_of(tiny, rows)
    # [0, 2): the prefix; layer 2: + the row steered from 1; layer 3: + the row steered from 2.
    assert rows_per_layer(tiny.model, lambda: shared_cache(tiny.model, batch)) == [1, 1, 2, 3]
    assert rows_per_layer(tiny.model, lambda: steered_cache(tiny.model, batch)) == [3, 3, 3, 3]
    assert_same_cache(shared_cache(tiny.model, batch), steered_cache(tiny.model, batch))


def test_the_head_every_prefix_starts_with_runs_once(tiny):
    """Four contexts, unsteered: the chat template's system turn (the shared head) runs once a
    layer, then each context's own tokens; without the sharing, every whole prefix."""
    rows = [DetectionExample(c, r, QUESTIONS[0]) for c, r in CONTEXTS]
    batch = batch_of(tiny, rows)
    head = prefix_share.shared_head(batch, list(range(len(rows))))
    chat = [{"role": "user", "content": "x"}]
    template = tiny.tokenizer.apply_chat_template(chat, tokenize=False)
    own = batch.prefix_ids[0, -int(batch.prefix_lens[0]) :]
    assert tiny.tokenizer.decode(own[:head]) == template[: template.index("x")]  # 24 tokens
    width, n = batch.prefix_ids.shape[1], len(rows)

    def tokens(run) -> int:
        return sum(rows_per_layer(tiny.model, run, tokens=True))

    layers = tiny.n_layers
    assert tokens(lambda: shared_cache(tiny.model, batch)) == layers * (head + n * (width - head))
    assert tokens(lambda: steered_cache(tiny.model, batch)) == layers * n * width
    # In bf16 the head's extra pass cost more than it saved (measured): every whole prefix.
    bf16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    assert sum(rows_per_layer(bf16, lambda: shared_cache(bf16, batch), tokens=True)) == (
        layers * n * width
    )
    plain = steered_cache(tiny.model, batch)
    assert_same_cache(shared_cache(tiny.model, batch), plain, real=batch.prefix_mask)


def test_the_shared_head_leaves_every_prefix_a_token_and_needs_a_few(tiny):
    prompt = build_prompt(tiny.tokenizer, DetectionExample("Hi", "Hello!", QUESTIONS[0]))
    ids, pad = prompt.prefix_ids, tiny.tokenizer.pad_token_id

    def head(prefixes) -> int:
        batch = collate([dataclasses.replace(prompt, prefix_ids=p) for p in prefixes], pad)
        found = prefix_share.shared_head(batch, list(range(len(prefixes))))
        if found:
            plain = steered_cache(tiny.model, batch)
            assert_same_cache(shared_cache(tiny.model, batch), plain, real=batch.prefix_mask)
        return found

    n = len(ids)
    # Each a prefix of the next: the shortest keeps its last token to itself.
    assert head([ids[: n - 3], ids[: n - 2], ids[: n - 1], ids]) == n - 4
    # The same 12 tokens, then each its own: 12; 7 is too few to be worth a pass.
    assert head([ids[:12] + [t] for t in range(4)]) == 12
    assert head([ids[:7] + [t] for t in range(4)]) == 0
    assert head([ids[:12] + [t] for t in range(3)]) == 0  # too few prefixes to save it for


def test_the_last_layer_runs_its_mlp_only_at_the_answers(tiny):
    """Its outputs feed no key or value: the prefix pass needs none of them, the suffix pass the
    answer position's only (a token per row, or per shared stream)."""
    n, d = tiny.n_layers, tiny.d_model
    rows = mixed_rows(n, d)
    batch = batch_of(tiny, rows)
    mlp = lambda run: rows_per_layer(tiny.model, run, "mlp", tokens=True)  # noqa: E731
    assert mlp(lambda: shared_cache(tiny.model, batch))[-1] == 0
    assert mlp(lambda: shared_cache(tiny.model, batch))[-2] > 0
    cache = steered_cache(tiny.model, batch)
    suffix = mlp(lambda: prefix_share.shared_suffix_hidden(tiny.model, batch, cache))
    assert suffix[-1] == len(rows) and suffix[-2] > len(rows)


def test_prefixes_with_the_same_padded_ids_but_different_lengths_stay_apart(tiny):
    """The pad id (<|im_end|>) is a real token of the template: a prefix that starts with it,
    padded, looks like a shorter one padded; only the length tells them apart."""
    prompt = build_prompt(tiny.tokenizer, DetectionExample("Hi", "Hello!", QUESTIONS[0]))
    pad = tiny.tokenizer.pad_token_id
    longer = dataclasses.replace(prompt, prefix_ids=[pad, *prompt.prefix_ids])
    steered = dataclasses.replace(prompt, steering=Steering(unit(tiny.d_model, 0), 1, 3, 30.0))
    batch = collate([prompt, longer, steered], pad)
    assert torch.equal(batch.prefix_ids[0], batch.prefix_ids[1])
    assert distinct_prefixes(batch) == ([0, 1], [0, 1, 0])
    assert prefix_share.shared_head(batch, [0, 1]) == 0  # they differ at the first token
    assert_same_cache(shared_cache(tiny.model, batch), steered_cache(tiny.model, batch))


def test_sharing_works_through_a_lora_wrapper(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # Random B matrices (not PEFT's zeros), so the adapter changes every layer's output.
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(copy.deepcopy(tiny.model), lora).eval()
    assert supported(model)
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    assert_same_cache(
        shared_cache(model, batch), steered_cache(model, batch), real=batch.prefix_mask
    )
    with torch.no_grad():
        shared = detection_logits(model, batch, share_prefixes=True)
        torch.testing.assert_close(shared, detection_logits(model, batch), atol=1e-4, rtol=0)
        assert (shared - detection_logits(tiny.model, batch)).abs().max() > 1e-2  # LoRA is live


def test_training_gradients_are_the_same_on_the_shared_cache(tiny):
    """The suffix pass runs under grad on either cache: the LoRA gradients agree."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny.model), lora)
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    grads = []
    for share in (True, False):
        model.zero_grad()
        logits = detection_logits(model, batch, share_prefixes=share)
        logits.gather(1, batch.answer_ids).log_softmax(-1)[:, 0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def tiny_other(kind: str, tokenizer):
    """A 4-layer Qwen2 (two sliding-window layers, or none) or Mistral (sliding window) with random
    weights; the window (8) is shorter than every prefix, so the windowed masks and caches count."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    dims = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "qwen2":
            config = Qwen2Config(**dims, use_sliding_window=True, sliding_window=8,
                                 max_window_layers=2)  # fmt: skip
            return Qwen2ForCausalLM(config).eval()
        if kind == "qwen2-full":  # no sliding window: the suffix is shared too
            return Qwen2ForCausalLM(Qwen2Config(**dims)).eval()
        return MistralForCausalLM(MistralConfig(**dims, sliding_window=8)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-full", "mistral"])
def test_qwen2_and_mistral_backbones_share_exactly(tiny, kind):
    """Qwen2 has biases on q, k, v; a sliding-window backbone keeps the plain suffix pass."""
    model = tiny_other(kind, tiny.tokenizer)
    assert supported(model)
    assert prefix_share.suffix_supported(model) == (kind == "qwen2-full")
    batch = batch_of(tiny, mixed_rows(4, 64))
    # A sliding window's layers keep their last tokens only, and share no head (see the module).
    real = batch.prefix_mask if prefix_share.suffix_supported(model) else None
    assert_same_cache(shared_cache(model, batch), steered_cache(model, batch), real=real)
    with torch.no_grad():
        torch.testing.assert_close(
            detection_logits(model, batch, share_prefixes=True),
            detection_logits(model, batch),
            atol=1e-4,
            rtol=0,
        )


def test_other_backbones_fall_back_to_the_plain_pass(tiny, monkeypatch):
    monkeypatch.setattr(prefix_share, "SUPPORTED", ())
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model)[:3])
    assert not supported(tiny.model)
    with pytest.raises(IntrospectError, match="prefix sharing"):
        shared_cache(tiny.model, batch)
    assert_same_cache(prefix_cache(tiny.model, batch), steered_cache(tiny.model, batch), atol=0)


def test_progress_still_counts_the_distinct_trials_scored(tiny):
    rows = mixed_rows(tiny.n_layers, tiny.d_model)
    rows = rows + [rows[0]]  # an unsteered duplicate is scored once
    calls = []
    score_detection(tiny.model, tiny.tokenizer, rows, 8, progress=lambda *a: calls.append(a))
    n = len(rows) - 1
    assert calls == [(0, n), *((k, n) for k in range(8, n, 8)), (n, n)]


def test_smollm2_shared_scores_equal_plain_scores(smollm):
    """The real 30-layer model: 4 contexts (their head shared), each with its unsteered twin
    and 3 steerings."""
    n, d = smollm.n_layers, smollm.d_model
    rows = []
    steerings = [(5, 15, 20.0), (10, 20, 40.0), (19, 29, 80.0)]
    for c, (context, reply) in enumerate(CONTEXTS):
        rows.append(DetectionExample(context, reply, QUESTIONS[0]))
        for k, (start, end, magnitude) in enumerate(steerings):
            s = Steering(unit(d, 10 * c + k), start, end, magnitude)
            rows.append(DetectionExample(context, reply, QUESTIONS[0], steering=s))
    batch = batch_of(smollm, rows)
    with torch.no_grad():
        shared = detection_logits(smollm.model, batch, share_prefixes=True)
        plain = detection_logits(smollm.model, batch)
    assert n == 30 and len(rows) == 16
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=0)
    for a, b in zip(answer_probabilities(shared, batch.answer_ids),
                    answer_probabilities(plain, batch.answer_ids), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- the shared suffix


def suffix_calls(model, batch, share: bool) -> list[int]:
    """Rows each decoder layer's attention runs in the suffix pass alone."""
    with torch.no_grad():
        cache = prefix_cache(model, batch)
    if share:
        return rows_per_layer(model, lambda: prefix_share.shared_suffix_hidden(model, batch, cache))
    return rows_per_layer(model, lambda: suffix_logits(model, batch, cache))


def test_a_suffix_runs_once_through_its_rows_first_steered_layers(tiny):
    """One prefix and question: unsteered, steered from layer 1, from layer 2, and at the last
    layer only (which reaches no key or value, so its suffix is the unsteered one throughout)."""
    n, d = tiny.n_layers, tiny.d_model
    rows = [DetectionExample("Hi", "Hello!", QUESTIONS[0])]
    rows += [dataclasses.replace(rows[0], steering=Steering(unit(d, k), k, n, 9.0)) for k in (1, 2)]
    rows += [dataclasses.replace(rows[0], steering=Steering(unit(d, 3), n - 1, n, 9.0))]
    batch = batch_of(tiny, rows)
    # Layers 0-1 read unsteered keys for everyone; layer 2: + the row steered from 1; 3: + 2.
    assert suffix_calls(tiny.model, batch, share=True) == [1, 1, 2, 3]
    assert suffix_calls(tiny.model, batch, share=False) == [4, 4, 4, 4]
    with torch.no_grad():
        shared = detection_logits(tiny.model, batch, share_prefixes=True)
        torch.testing.assert_close(shared, detection_logits(tiny.model, batch), atol=1e-4, rtol=0)
    assert (shared[1] - shared[0]).abs().max() > 1e-2  # the steerings matter
    torch.testing.assert_close(shared[3], shared[0], atol=1e-5, rtol=0)


def test_leaving_the_suffix_a_layer_late_is_caught_and_early_is_only_slower(tiny, monkeypatch):
    """The test can fail: a row that stays with its twin through the layer after its first
    steered one reads unsteered keys there, and its answer moves. Leaving earlier is exact. The
    cache is the plain pass's, so only the suffix pass leaves at the shifted layers."""
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    with torch.no_grad():
        cache = steered_cache(tiny.model, batch)
        plain = suffix_hidden(tiny.model, batch, cache)
        right = prefix_share.leave_layers
        for shift, exact in ((1, False), (-1, True)):
            monkeypatch.setattr(prefix_share, "leave_layers", lambda s, n, k=shift: [
                min(max(x + k, 1), n) for x in right(s, n)])  # fmt: skip
            gap = (prefix_share.shared_suffix_hidden(tiny.model, batch, cache) - plain).abs().max()
            assert (gap < 1e-4) == exact, (shift, float(gap))
