"""Training's passes without padding (introspect.packed) against the padded passes."""

import pytest
import torch
import torch.nn.functional as F
from test_shared_prefix import assert_same_cache, batch_of, mixed_rows, tiny_other

from introspect import packed
from introspect.detection import build_prompt, steered_cache, suffix_hidden
from introspect.recompute import checkpoint_layers
from introspect.train import answer_pair, label_targets


def both_passes(model, batch):
    with torch.no_grad():
        padded = suffix_hidden(model, batch, steered_cache(model, batch))
        cache = packed.packed_cache(model, batch)
        return padded, packed.packed_suffix_hidden(model, batch, cache), cache


def test_packed_passes_equal_the_padded_ones(tiny):
    """Rows of different lengths, steered at different layers, over token slices, or not."""
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    assert len(set(batch.prefix_lens.tolist())) > 1 and len(set(batch.suffix_lens.tolist())) > 1
    padded, got, cache = both_passes(tiny.model, batch)
    # The cache holds the real prefix tokens only, row after row.
    assert cache.layers[0].keys.shape[:3] == (1, 2, int(batch.prefix_lens.sum()))
    torch.testing.assert_close(got, padded, atol=1e-4, rtol=0)
    # The steerings matter here: rows of one context differ.
    assert len({round(float(h[0]), 3) for h in padded}) > 3 * 2


def test_a_query_reading_one_key_too_many_is_caught(tiny, monkeypatch):
    """The comparison can fail: a layout whose queries see the next token's key differs."""
    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model)[:6])
    layout = packed._layout

    def leaky(prefix, suffix, device):
        right = layout(prefix, suffix, device)
        mask = right.mask | torch.roll(right.mask, 1, dims=-1)
        return packed.Layout(right.q_index, right.kv_index, mask, right.unpack)

    monkeypatch.setattr(packed, "_layout", leaky)
    padded, got, _ = both_passes(tiny.model, batch)
    assert float((got - padded).abs().max()) > 1e-3


def test_training_steps_packed_equal_padded_also_checkpointed(tiny):
    """The loss and every gradient, with LoRA-free full gradients on tiny-random; the packed
    pass under gradient checkpointing replays its attention packed; a shared prefix pass
    (contexts_per_batch) repacked for the packed suffix pass."""
    import copy

    rows = mixed_rows(tiny.n_layers, tiny.d_model)
    prompts = [build_prompt(tiny.tokenizer, r) for r in rows]
    targets = label_targets([r.steering is not None for r in rows])
    pad = tiny.tokenizer.pad_token_id
    runs = {}
    cases = [("padded", False, False, False), ("packed", True, False, False),
             ("packed, checkpointed", True, True, False), ("shared, packed", True, False, True),
             ("shared, packed, checkpointed", True, True, True)]  # fmt: skip
    for name, pack, checkpointed, share in cases:
        model = copy.deepcopy(tiny.model)
        packed.use_packed(model)
        if checkpointed:
            checkpoint_layers(model)
        model.train()
        assert packed.can_pack(model)
        pair = answer_pair(model, prompts, pad, packed=pack, share_prefixes=share)
        loss = F.cross_entropy(pair, targets)
        loss.backward()
        runs[name] = loss.item(), {n: p.grad for n, p in model.named_parameters()}
    want_loss, want = runs["padded"]
    for name, *_ in cases[1:]:
        loss, grads = runs[name]
        assert loss == pytest.approx(want_loss, abs=1e-5), name
        for n, g in want.items():
            torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=f"{name}: {n}")


def test_a_shared_prefix_cache_packs_as_the_packed_pass_lays_it_out(tiny):
    """pack_cache of the shared (padded) prefix pass holds what packed_cache computes."""
    from introspect.detection import prefix_cache

    batch = batch_of(tiny, mixed_rows(tiny.n_layers, tiny.d_model))
    with torch.no_grad():
        shared = prefix_cache(tiny.model, batch, share_prefixes=True)
        want = packed.packed_cache(tiny.model, batch)
    got = packed.pack_cache(tiny.model, shared, batch)
    assert_same_cache(got, want, atol=1e-5)
    # Rows in the wrong order would not match: the comparison can fail.
    flipped = packed.pack_cache(tiny.model, shared, batch_of(tiny, mixed_rows(
        tiny.n_layers, tiny.d_model)[::-1]))  # fmt: skip
    assert max(float((a.keys - b.keys).abs().max()) if a.keys.shape == b.keys.shape else 1.0
               for a, b in zip(flipped.layers, want.layers, strict=True)) > 1e-3  # fmt: skip


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-full", "mistral"])
def test_qwen2_packs_and_sliding_windows_keep_the_padded_pass(tiny, kind):
    """Qwen2 has biases on q, k, v; a sliding window is not packed."""
    model = tiny_other(kind, tiny.tokenizer)
    packed.use_packed(model)
    assert packed.can_pack(model) == (kind == "qwen2-full")
    if kind == "qwen2-full":
        padded, got, _ = both_passes(model, batch_of(tiny, mixed_rows(4, 64)))
        torch.testing.assert_close(got, padded, atol=1e-4, rtol=0)


def test_eager_attention_and_plain_checkpointing_keep_the_padded_pass(tiny):
    import copy

    model = copy.deepcopy(tiny.model)
    checkpoint_layers(model)  # without use_packed: a replay would not be packed
    assert not packed.can_pack(model)
    model = copy.deepcopy(tiny.model)
    model.config._attn_implementation = "eager"
    assert not packed.can_pack(model)
    packed.use_packed(model)
    assert model.config._attn_implementation == "eager"
