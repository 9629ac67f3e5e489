"""Sigmoid attention specifics: the default bias, and the multi-block (checkpointed) path against the reference."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.softmax import sigmoid
from tests.helpers import assert_decodes, qkv


def test_default_bias_is_minus_log_seq_kv():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(1, 2, 11, 4, dtype=torch.float64), torch.randn(1, 2, 11, 4, dtype=torch.float64)
    default = az.attention(q, k, v, method="sigmoid")
    explicit = az.attention(q, k, v, method="sigmoid", sigmoid_bias=-math.log(11))
    torch.testing.assert_close(default, explicit)
    by_hand = torch.sigmoid(q @ k.transpose(-1, -2) / 2 - math.log(11)) @ v
    torch.testing.assert_close(default, by_hand)


def test_many_blocks_with_checkpointing_match_reference(monkeypatch):
    monkeypatch.setattr(sigmoid, "SCORES_PER_TILE", 3 * 16 * 16)  # 16-row blocks: 4 blocks, last one short
    monkeypatch.setattr(sigmoid, "KEYS_PER_TILE", 16)  # 16-key chunks: 3 per row, last one short
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(50, 40, generator=g) < 0.8
    for causal in (False, True):
        out = az.attention(q, k, v, method="sigmoid", causal=causal, mask=mask, backend="torch")
        ref = az.attention(q, k, v, method="sigmoid", causal=causal, mask=mask, backend="reference")
        torch.testing.assert_close(out, ref)
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
        want = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.square().sum(), inputs)


def test_bias_gradient_matches_reference_for_every_broadcast_shape(monkeypatch):
    monkeypatch.setattr(sigmoid, "SCORES_PER_TILE", 2 * 2 * 30 * 10)  # one row block, both kv heads per tile
    monkeypatch.setattr(sigmoid, "KEYS_PER_TILE", 10)  # three key chunks, the last one short
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 24, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 24, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for shape in ((2, 4, 30, 24), (1, 4, 1, 24), (2, 1, 30, 1), (1, 1, 30, 24)):
        bias = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        for causal in (False, True):
            out = az.attention(q, k, v, method="sigmoid", causal=causal, bias=bias, backend="torch")
            ref = az.attention(q, k, v, method="sigmoid", causal=causal, bias=bias, backend="reference")
            torch.testing.assert_close(out, ref)
            for a, b in zip(_grads(out, (q, k, v, bias)), _grads(ref, (q, k, v, bias))):
                torch.testing.assert_close(a, b)


def test_causal_cross_lengths_give_zero_rows_and_match_reference(monkeypatch):
    monkeypatch.setattr(sigmoid, "SCORES_PER_TILE", 16 * 8)
    monkeypatch.setattr(sigmoid, "KEYS_PER_TILE", 8)
    g = torch.Generator().manual_seed(2)
    for sq, skv in ((40, 9), (9, 40)):
        q = torch.randn(1, 2, sq, 4, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, 2, skv, 4, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, 2, skv, 4, generator=g, dtype=torch.float64, requires_grad=True)
        out = az.attention(q, k, v, method="sigmoid", causal=True, backend="torch")
        ref = az.attention(q, k, v, method="sigmoid", causal=True, backend="reference")
        torch.testing.assert_close(out, ref)
        if sq > skv:  # rows i < sq − skv see no key
            assert out[:, :, : sq - skv].abs().max() == 0
        for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b)


def test_sigmoid_decoding_needs_an_explicit_bias() -> None:
    q, k, v = qkv(2, 4, 2, 20)
    with pytest.raises(AttnzooError, match="sigmoid_bias"):
        az.prefill(q, k, v, method="sigmoid")
    assert_decodes("sigmoid", q, k, v, [9, 4], sigmoid_bias=-math.log(20))
