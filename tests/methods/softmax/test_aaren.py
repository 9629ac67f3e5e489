"""S12 Aaren: with one query per head it is the softmax attention of that query over every prefix (the paper's
many-to-many RNN), the scan matches the dense reference past several chunks (values and gradients), padding keys are
never attended, the decoding state does not grow with the sequence, and bad input names its argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv


def test_a_constant_query_attends_over_every_prefix() -> None:
    _, k, v = qkv(2, 4, 2, 40, seed=0)
    query = torch.randn(4, 8, dtype=k.dtype)
    q = query.view(1, 4, 1, 8).expand(2, 4, 40, 8)
    got = az.attention(q, k, v, method="aaren", causal=True)
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    one = query.view(1, 4, 1, 8).expand(2, 4, 1, 8)
    want = torch.cat([F.scaled_dot_product_attention(one, kr[:, :, : t + 1], vr[:, :, : t + 1]) for t in range(40)], 2)
    torch.testing.assert_close(got, want)


def test_scan_matches_the_cumulative_softmax_past_several_chunks() -> None:
    q, k, v = qkv(1, 2, 1, 300, seed=1, requires_grad=True)  # 300 = 5 chunks of 64, totals scanned once more
    cot = torch.randn(1, 2, 300, 8, dtype=q.dtype)
    outs = {}
    for backend in ("torch", "reference"):
        out = az.attention(q, k, v, method="aaren", causal=True, backend=backend, scale=2.0)
        outs[backend] = (out, *torch.autograd.grad((out * cot).sum(), (q, k, v)))
    for got, want in zip(outs["torch"], outs["reference"], strict=True):
        torch.testing.assert_close(got, want)


def test_padding_keys_are_never_attended() -> None:
    q, k, v = qkv(1, 2, 2, 9, seed=2)
    pad = 4  # a left-padded copy of the same sequence
    noise = qkv(1, 2, 2, pad, seed=3)
    padded = [torch.cat([n, t], dim=2) for n, t in zip(noise, (q, k, v), strict=True)]
    key_mask = torch.arange(pad + 9).view(1, -1) >= pad
    got = az.attention(*padded, method="aaren", causal=True, key_mask=key_mask)
    torch.testing.assert_close(got[:, :, pad:], az.attention(q, k, v, method="aaren", causal=True))
    assert bool((got[:, :, :pad] == 0).all())


def test_decoding_state_does_not_grow_with_the_sequence() -> None:
    q, k, v = qkv(2, 4, 2, 200, seed=4)
    sizes = []
    for n in (10, 200):
        _, state = az.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], method="aaren")
        _, state = az.step(state, q[:, :, :1], k[:, :, :1], v[:, :, :1])
        sizes.append([tuple(t.shape) for t in state.data])
    assert sizes[0] == sizes[1] == [(2, 2, 2), (2, 2, 2), (2, 2, 2, 8)]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"key_mask": torch.ones(2, 5, dtype=torch.bool)}, "key_mask"),  # wrong length
        ({"key_mask": torch.ones(2, 6)}, "key_mask"),  # not bool
        ({"mask": torch.ones(6, 6, dtype=torch.bool)}, "mask"),  # a per-row mask cannot be scanned
        ({"bias": torch.zeros(6, 6, dtype=torch.float64)}, "bias"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, argument: str) -> None:
    q, k, v = qkv(2, 2, 2, 6)
    call = {"causal": True, **kwargs}
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        az.attention(q, k, v, method="aaren", **call)
