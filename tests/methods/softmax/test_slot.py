"""S10 slot attention's step: slots compete for each input (the softmax runs over the queries), ε lets a slot that
wins nothing take the plain mean, a padding key weighs exactly 0, and GQA groups match repeated heads."""

from __future__ import annotations

import torch

import attnzoo as az
from tests.helpers import qkv


def test_each_input_is_shared_out_among_the_slots() -> None:
    q, k, _ = qkv(2, 2, 2, 5, skv=9, seed=0)
    v = torch.eye(9, dtype=q.dtype).expand(2, 2, 9, 9)  # one-hot values: the output row is the weight row
    weights = az.attention(q, k, v, method="slot", eps=0.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5, dtype=q.dtype))  # a weighted mean per slot
    raw = torch.softmax((q @ k.transpose(-1, -2)) / 8**0.5, dim=-2)  # over the slots
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))


def test_a_slot_that_wins_nothing_takes_the_plain_mean_through_eps() -> None:
    _, k, v = qkv(1, 1, 1, 2, skv=6, seed=1)
    k = k.abs() + 0.1  # every key has a positive dot product with the all-ones direction
    q = torch.stack([torch.ones(8), -torch.ones(8)]).to(k.dtype).view(1, 1, 2, 8) * 1e3  # slot 1 loses every input
    out = az.attention(q, k, v, method="slot")
    torch.testing.assert_close(out[:, :, 1], v.mean(2))
    assert bool((az.attention(q, k, v, method="slot", eps=0.0)[:, :, 1] == 0).all())  # without ε: nothing won


def test_padding_keys_weigh_exactly_zero() -> None:
    q, k, v = qkv(2, 2, 1, 4, skv=7, seed=2)
    mask = torch.tensor([True] * 5 + [False] * 2).view(1, 1, 1, 7)
    got = az.attention(q, k, v, method="slot", mask=mask)
    torch.testing.assert_close(got, az.attention(q, k[:, :, :5], v[:, :, :5], method="slot"))


def test_gqa_matches_repeated_key_heads() -> None:
    q, k, v = qkv(2, 4, 2, 3, skv=10, seed=3)
    want = az.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method="slot", backend="torch")
    torch.testing.assert_close(az.attention(q, k, v, method="slot", backend="torch"), want)
