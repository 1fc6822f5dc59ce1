"""Checks of introspect.steering: what the hooks add, where, to which rows, and their removal."""

from contextlib import contextmanager

import pytest
import torch

from introspect.errors import IntrospectError
from introspect.models import decoder_layers
from introspect.steering import Steering, position_mask, steer

D_MODEL, N_LAYERS = 64, 4  # tiny-random


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 5000, (batch, length), generator=torch.Generator().manual_seed(seed))


def hook_counts(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in decoder_layers(model)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@contextmanager
def capturing(model):
    """Record every decoder layer's output, as seen by hooks registered after those before it."""
    store: dict[int, torch.Tensor] = {}

    def save(i):
        def hook(_module, _inputs, output):
            store[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    handles = [
        layer.register_forward_hook(save(i)) for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model, ids, steerings=None, mask=None) -> dict[int, torch.Tensor]:
    """Each layer's output after steering (the capture hooks run after the steering hooks)."""
    with torch.no_grad():
        if steerings is None:
            with capturing(model) as out:
                model(ids)
        else:
            with steer(model, steerings, mask=mask), capturing(model) as out:
                model(ids)
    return out


# --- hooks are removed ------------------------------------------------------------------------


def test_hooks_are_removed_after_normal_exit(tiny):
    ids = token_ids(1, 7)
    counts, before = hook_counts(tiny.model), logits(tiny.model, ids)
    with steer(tiny.model, Steering(unit(D_MODEL, 1), 1, 3, 10.0)):
        assert hook_counts(tiny.model) == [c + (1 <= i < 3) for i, c in enumerate(counts)]
        steered = logits(tiny.model, ids)
    assert hook_counts(tiny.model) == counts
    assert not torch.allclose(steered, before, atol=1e-3)
    assert torch.equal(logits(tiny.model, ids), before)


def test_hooks_are_removed_when_the_body_raises(tiny):
    ids = token_ids(1, 7)
    counts, before = hook_counts(tiny.model), logits(tiny.model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny.model, Steering(unit(D_MODEL, 1), 0, N_LAYERS, 10.0)):
            assert hook_counts(tiny.model) == [c + 1 for c in counts]
            raise RuntimeError("boom")
    assert hook_counts(tiny.model) == counts
    assert torch.equal(logits(tiny.model, ids), before)


def test_hooks_are_removed_when_a_hook_raises_mid_forward(tiny):
    ids = token_ids(3, 5)
    counts, before = hook_counts(tiny.model), logits(tiny.model, ids)
    two_rows = [Steering(unit(D_MODEL, 1), 0, 2, 4.0), None]
    with pytest.raises(IntrospectError, match="steering"):
        with steer(tiny.model, two_rows):
            tiny.model(ids)  # a batch of 3 for 2 row steerings
    assert hook_counts(tiny.model) == counts
    assert torch.equal(logits(tiny.model, ids), before)


# --- what is added, and where -----------------------------------------------------------------


def test_layer_start_output_moves_by_exactly_magnitude_times_v(tiny):
    ids = token_ids(2, 6)
    v, start, end, magnitude = unit(D_MODEL, 2), 2, 4, 7.5
    plain = layer_outputs(tiny.model, ids)
    steered = layer_outputs(tiny.model, ids, Steering(v, start, end, magnitude))
    for i in range(start):
        assert torch.equal(steered[i], plain[i])
    expected = (magnitude * v).expand_as(plain[start])
    torch.testing.assert_close(steered[start] - plain[start], expected, atol=1e-5, rtol=0)
    # Later layers see the steered input too, so their change is more than the addition.
    assert not torch.allclose(steered[start + 1] - plain[start + 1], expected, atol=1e-2)


def test_each_layer_adds_magnitude_times_v_inside_its_range_and_nothing_outside(tiny):
    ids = token_ids(1, 6)
    v, start, end, magnitude = unit(D_MODEL, 3), 1, 3, 5.0
    model = tiny.model
    # `raw` hooks run before the steering hooks, `final` ones after: the gap is what steering adds.
    with torch.no_grad(), capturing(model) as raw:
        with steer(model, Steering(v, start, end, magnitude)), capturing(model) as final:
            model(ids)
    for i in range(N_LAYERS):
        added = magnitude * v if start <= i < end else torch.zeros(D_MODEL)
        torch.testing.assert_close(
            final[i] - raw[i], added.expand_as(raw[i]), atol=1e-5, rtol=0, msg=f"layer {i}"
        )


def test_each_row_gets_its_own_steering_and_an_unsteered_row_is_untouched(tiny):
    ids = token_ids(3, 6)
    s0 = Steering(unit(D_MODEL, 4), 0, 2, 6.0)
    s2 = Steering(unit(D_MODEL, 5), 2, 4, 3.0)
    plain = layer_outputs(tiny.model, ids)
    steered = layer_outputs(tiny.model, ids, [s0, None, s2])
    for i in range(N_LAYERS):
        torch.testing.assert_close(steered[i][1], plain[i][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        steered[0][0] - plain[0][0], (6.0 * s0.vector).expand(6, -1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        steered[2][2] - plain[2][2], (3.0 * s2.vector).expand(6, -1), atol=1e-5, rtol=0
    )
    assert torch.equal(steered[1][2], plain[1][2])  # row 2 starts at layer 2
    # A steered row in the batch equals that row steered on its own.
    alone = layer_outputs(tiny.model, ids[:1], s0)
    torch.testing.assert_close(steered[N_LAYERS - 1][0], alone[N_LAYERS - 1][0], atol=1e-5, rtol=0)


def test_position_mask_for_left_padded_rows():
    v = unit(D_MODEL, 0)
    rows = [
        Steering(v, 0, 1, 1.0, positions=(1, 3)),  # 4 real tokens, offset 1: columns 2, 3
        None,
        Steering(v, 0, 1, 1.0),  # 3 real tokens, all steered: columns 2, 3, 4
        Steering(v, 0, 1, 1.0, positions=(0, 5)),  # 5 real tokens, no padding
    ]
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(position_mask(rows, [4, 2, 3, 5], 5), expected)


def test_position_mask_rejects_a_slice_past_the_row():
    with pytest.raises(IntrospectError, match="positions"):
        position_mask([Steering(unit(D_MODEL, 0), 0, 1, 1.0, positions=(2, 5))], [4], 6)


def test_masked_steering_adds_only_at_masked_positions(tiny):
    ids = token_ids(2, 6)
    s0 = Steering(unit(D_MODEL, 6), 1, 2, 4.0, positions=(1, 3))
    s1 = Steering(unit(D_MODEL, 7), 1, 3, 2.0)
    mask = position_mask([s0, s1], [6, 4], 6)
    plain = layer_outputs(tiny.model, ids)
    steered = layer_outputs(tiny.model, ids, [s0, s1], mask=mask)
    expected = torch.zeros(2, 6, D_MODEL)
    expected[0, 1:3] = 4.0 * s0.vector
    expected[1, 2:6] = 2.0 * s1.vector
    torch.testing.assert_close(steered[1] - plain[1], expected, atol=1e-5, rtol=0)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steering", "field"),
    [
        (Steering(unit(D_MODEL + 1, 0), 0, 2, 1.0), "vector"),
        (Steering(unit(D_MODEL, 0)[None], 0, 2, 1.0), "vector"),
        (Steering(2 * unit(D_MODEL, 0), 0, 2, 1.0), "vector"),
        (Steering(unit(D_MODEL, 0), 0, N_LAYERS + 1, 1.0), "layer_start"),
        (Steering(unit(D_MODEL, 0), 3, 3, 1.0), "layer_start"),
        (Steering(unit(D_MODEL, 0), -1, 2, 1.0), "layer_start"),
        (Steering(unit(D_MODEL, 0), 0, 2, float("inf")), "magnitude"),
        (Steering(unit(D_MODEL, 0), 0, 2, float("nan")), "magnitude"),
        (Steering(unit(D_MODEL, 0), 0, 2, 1.0, positions=(3, 1)), "positions"),
    ],
    ids=["dim", "matrix", "not-unit", "past-end", "empty", "negative", "inf", "nan", "slice"],
)
def test_invalid_steering_raises_naming_the_field(tiny, steering, field):
    counts = hook_counts(tiny.model)
    with pytest.raises(IntrospectError, match=field):
        with steer(tiny.model, [None, steering]):
            pass
    assert hook_counts(tiny.model) == counts


def test_a_nan_vector_is_rejected(tiny):
    with pytest.raises(IntrospectError, match="vector"):
        with steer(tiny.model, Steering(torch.full((D_MODEL,), float("nan")), 0, 2, 1.0)):
            pass


def test_valid_edge_cases_are_accepted(tiny):
    # The whole depth, a vector off unit length by less than the tolerance, a zero magnitude.
    v = unit(D_MODEL, 0) * (1 + 5e-4)
    for s in [Steering(v, 0, N_LAYERS, 1.0), Steering(v, N_LAYERS - 1, N_LAYERS, 0.0)]:
        with steer(tiny.model, s):
            pass
