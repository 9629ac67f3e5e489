"""K8 LoCoCoPress: the default keeps the recent tokens, the fixed size holds over steps, fusion, fitting, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import LoCoCoPress, fit_lococo
from tests.helpers import qkv


def positions(cache, b=0, h=0):
    return cache.positions[b, h].tolist()


@pytest.mark.parametrize("chunk", [None, 3, 1])
def test_default_keeps_the_most_recent_tokens(chunk) -> None:
    q, k, v = qkv(1, 2, 1, 10)
    _, state = az.prefill(q, k, v, method="softmax", press=LoCoCoPress(size=4, chunk=chunk))
    assert positions(state.data) == [6, 7, 8, 9]
    assert torch.equal(state.data.keys[0, 0], k[0, 0, 6:]) and torch.equal(state.data.values[0, 0], v[0, 0, 6:])


def test_size_is_fixed_over_decode_steps_and_ragged_batches() -> None:
    q, k, v = qkv(2, 4, 2, 12)
    lengths = torch.tensor([9, 3])
    press = LoCoCoPress(size=4)
    _, state = az.prefill(q[:, :, :9], k[:, :, :9], v[:, :, :9], method="softmax", lengths=lengths, press=press)
    assert positions(state.data, 0) == [5, 6, 7, 8]
    assert positions(state.data, 1, 1) == [-1, 0, 1, 2]
    for t in range(3):
        token = [torch.stack([x[b, :, int(lengths[b]) + t] for b in range(2)]).unsqueeze(2) for x in (q, k, v)]
        out, state = az.step(state, *token)
        assert state.data.slots == 4
        window = [k[b:b + 1, :, max(0, int(lengths[b]) + t - 4) : int(lengths[b]) + t + 1] for b in range(2)]
        vwin = [v[b:b + 1, :, max(0, int(lengths[b]) + t - 4) : int(lengths[b]) + t + 1] for b in range(2)]
        for b in range(2):  # the step attends over the last 4 tokens and itself: a sliding window
            ref = torch.nn.functional.scaled_dot_product_attention(token[0][b:b + 1], window[b], vwin[b],
                                                                   enable_gqa=True)
            assert torch.allclose(out[b:b + 1], ref)
    assert positions(state.data, 0) == [8, 9, 10, 11]
    assert positions(state.data, 1) == [2, 3, 4, 5]


def test_two_taps_average_neighbouring_candidates() -> None:
    q, k, v = qkv(1, 1, 1, 3)
    press = LoCoCoPress(size=2, kernel=torch.zeros(2, dtype=k.dtype), chunk=3)
    _, state = az.prefill(q, k, v, method="softmax", press=press)
    assert torch.allclose(state.data.keys[0, 0, 0], (k[0, 0, 0] + k[0, 0, 1]) / 2)
    assert torch.allclose(state.data.values[0, 0, 1], (v[0, 0, 1] + v[0, 0, 2]) / 2)


def test_gamma_makes_the_weights_follow_the_attention_mass() -> None:
    q, k, v = qkv(1, 1, 1, 3)
    q[0, 0, 1:] = 20 * k[0, 0, 1] / k[0, 0, 1].norm()  # the last two queries read token 1
    press = LoCoCoPress(size=1, kernel=torch.zeros(3, dtype=k.dtype), gamma=5.0, chunk=3)
    _, state = az.prefill(q, k, v, method="softmax", press=press)
    assert positions(state.data) == [1]


def test_fitting_does_not_do_worse_than_the_recent_window() -> None:
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 1, 24, seed=4)
    press = fit_lococo(q, k, v, size=6, taps=3, probe=6, steps=20)
    assert press.kernel.shape == (1, 3) and press.gamma.shape == (1,)

    def error(p):
        _, state = az.prefill(q[:, :, :18], k[:, :, :18], v[:, :, :18], method="softmax", press=p)
        out, _ = az.step(state, q[:, :, 18:], k[:, :, 18:], v[:, :, 18:])
        full = az.attention(q, k, v, method="softmax", causal=True)[:, :, 18:]
        return (out - full).pow(2).mean()

    assert error(press) <= error(LoCoCoPress(size=6, chunk=None)) + 1e-9


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"size": 0}, "size"),
    ({"size": 4, "kernel": torch.zeros(2, dtype=torch.long)}, "kernel"),
    ({"size": 4, "gamma": "x"}, "gamma"),
    ({"size": 4, "chunk": 0}, "chunk"),
])
def test_bad_arguments_are_named(kwargs, name) -> None:
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        LoCoCoPress(**kwargs)


def test_mismatched_kernel_heads_budget_and_probe_are_named() -> None:
    q, k, v = qkv(1, 2, 2, 6)
    with pytest.raises(AttnzooError, match="^kernel:"):
        az.prefill(q, k, v, method="softmax", press=LoCoCoPress(size=2, kernel=torch.zeros(3, 1)))
    with pytest.raises(AttnzooError, match="^tokens:"):
        LoCoCoPress.for_budget(0.5)
    assert LoCoCoPress.for_budget(0.25, tokens=64).size == 16
    with pytest.raises(AttnzooError, match="^probe:"):
        fit_lococo(q, k, v, size=2, probe=6)
