"""K16 MoAPress and profile_moa: kept windows per head and layer, profiling picks far-reaching heads, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import MoAPress, profile_moa
from tests.helpers import qkv


def kept_positions(cache, b, h):
    pos = cache.positions[b, h]
    return sorted(pos[pos >= 0].tolist())


def test_each_head_keeps_sinks_and_its_window() -> None:
    q, k, v = qkv(1, 4, 2, 12)
    press = MoAPress(spans=torch.tensor([2, 5]), sinks=1)
    _, state = az.prefill(q, k, v, method="softmax", press=press)
    assert kept_positions(state.data, 0, 0) == [0, 10, 11]
    assert kept_positions(state.data, 0, 1) == [0, 7, 8, 9, 10, 11]
    q1, k1, v1 = qkv(1, 4, 2, 1, seed=1)
    _, state = az.step(state, q1, k1, v1)
    assert kept_positions(state.data, 0, 0) == [0, 11, 12]  # the window slides at each step
    assert kept_positions(state.data, 0, 1) == [0, 8, 9, 10, 11, 12]


def test_per_layer_spans_read_the_layer() -> None:
    q, k, v = qkv(1, 2, 2, 10)
    press = MoAPress(spans=torch.tensor([[1, 1], [3, 3]]), sinks=0)
    _, state = az.prefill(q, k, v, method="softmax", press=press, layer=1)
    assert kept_positions(state.data, 0, 0) == [7, 8, 9]
    with pytest.raises(AttnzooError, match="layer"):
        az.prefill(q, k, v, method="softmax", press=press)


def test_ragged_batch_prefill_then_steps_matches_a_windowed_reference() -> None:
    q, k, v = qkv(2, 2, 2, 10)
    lengths = torch.tensor([10, 6])
    press = MoAPress(spans=torch.tensor([3, 4]), sinks=2)
    _, state = az.prefill(q, k, v, method="softmax", lengths=lengths, press=press)
    assert kept_positions(state.data, 1, 0) == [0, 1, 3, 4, 5]
    for t in range(3):
        q1, k1, v1 = qkv(2, 2, 2, 1, seed=10 + t)
        out, state = az.step(state, q1, k1, v1)
    assert kept_positions(state.data, 1, 1) == [0, 1, 5, 6, 7, 8]
    assert kept_positions(state.data, 0, 0) == [0, 1, 10, 11, 12]
    assert out.shape == (2, 2, 1, 8) and torch.isfinite(out).all()


def test_profiling_gives_far_reaching_heads_longer_spans() -> None:
    s = 32
    eye = torch.eye(s, dtype=torch.float64)
    k = torch.stack([eye, eye]).unsqueeze(0)  # key i = e_i
    back = torch.arange(s) - 12
    q_far = 30 * eye[torch.where(back >= 0, back, torch.arange(s))]  # kv head 0: each query reads 12 positions back
    q = torch.stack([q_far, 30 * eye]).unsqueeze(0)  # kv head 1: each query reads itself
    spans = profile_moa([(q, k, k), (q.flip(1), k, k)], budget=9, sinks=0, candidates=[1, 2, 4, 8, 16], scale=1.0)
    assert spans[0, 0] == 16 and spans[1, 1] == 16  # the far-reaching head of each layer
    assert spans[0, 1] <= 2 and spans[1, 0] <= 2  # the local heads give their budget away
    uniform = profile_moa([(q, k, k)], budget=9, sinks=0, candidates=[8], scale=1.0)
    assert uniform.tolist() == [[8, 8]]


def test_for_budget_profiles_the_calibration() -> None:
    q, k, v = qkv(1, 2, 2, 16)
    press = MoAPress.for_budget(0.5, calibration=[(q, k, v)], sinks=2)
    assert isinstance(press, MoAPress) and press.spans.shape == (1, 2)
    assert press.spans.float().mean() <= 0.5 * 16 - 2


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"spans": torch.tensor([0, 2])}, "spans"),
    ({"spans": torch.tensor([1.5, 2.0])}, "spans"),
    ({"spans": torch.tensor([2, 2]), "sinks": -1}, "sinks"),
])
def test_bad_press_arguments_are_named(kwargs, name) -> None:
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        MoAPress(**kwargs)


def test_spans_must_match_the_kv_heads_and_profiling_inputs_are_checked() -> None:
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(AttnzooError, match="^spans:"):
        az.prefill(q, k, v, method="softmax", press=MoAPress(spans=torch.tensor([2, 2, 2])))
    with pytest.raises(AttnzooError, match="^budget:"):
        profile_moa([(q, k, v)], budget=0.5)
    with pytest.raises(AttnzooError, match="^calibration:"):
        profile_moa([(q, k[..., :4], v)], budget=4)
    with pytest.raises(AttnzooError, match="^calibration:"):
        MoAPress.for_budget(0.5)
