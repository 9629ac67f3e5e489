"""H3 MoH: the routed-rows path skips the pairs the router left out (counted FLOPs), equals the gated dense
reference across causal chunks, masks and bias, treats a zero weight as "not computed" (no gradient), and the routing
follows the paper (top-k, renormalisation, two-group balance, load-balance loss)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads import moh
from tests.helpers import assert_matches_reference, qkv


def _routed(b: int, h: int, n: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """``head_weights (b, h, n)`` from random router logits, every head routed, ``top_k`` kept per token."""
    logits = torch.randn(b, n, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return moh.route(logits, top_k).weights.transpose(1, 2)


def _flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` with SDPA on its math kernel (matrix products FlopCounterMode counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_only_the_routed_rows_are_computed() -> None:
    q, k, v = qkv(2, 8, 2, 64, dtype=torch.float32)
    weights = _routed(2, 8, 64, 4).float()
    routed = _flops(lambda: az.attention(q, k, v, method="moh", backend="torch", head_weights=weights))
    every_head = _flops(lambda: az.attention(q, k, v))
    assert every_head == 2 * 8 * 64 * 64 * 2 * (8 + 8)  # QKᵀ and PV over every (token, head)
    assert routed == every_head // 2  # 4 of 8 heads per token: exactly half the rows reach the kernel


def test_causal_rows_skip_the_masked_half_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moh, "CAUSAL_CHUNK", 8)
    q, k, v = qkv(1, 4, 4, 128, dtype=torch.float32)
    weights = _routed(1, 4, 128, 2).float()
    causal = _flops(lambda: az.attention(q, k, v, method="moh", causal=True, backend="torch", head_weights=weights))
    noncausal = _flops(lambda: az.attention(q, k, v, method="moh", backend="torch", head_weights=weights))
    assert causal < 0.6 * noncausal


def test_a_head_no_token_selects_is_never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = []

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        rows.append(q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=kw["scale"])

    monkeypatch.setattr(moh, "sdpa_attention", counting)
    q, k, v = qkv(1, 3, 3, 10)
    weights = torch.zeros(1, 3, 10, dtype=q.dtype)
    weights[0, 0] = 1.0  # head 0 shared: one call over every row
    weights[0, 1, [2, 5]] = 0.5  # head 1: two rows; head 2: none
    out = az.attention(q, k, v, method="moh", backend="torch", head_weights=weights)
    assert sorted(rows) == [2, 10]
    assert bool((out[0, 2] == 0).all()) and bool((out[0, 1, [0, 1, 3, 4, 6, 7, 8, 9]] == 0).all())


@pytest.mark.parametrize("causal", [False, True])
def test_routed_rows_equal_the_gated_reference_across_chunks_masks_and_bias(
    causal: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(moh, "CAUSAL_CHUNK", 3)
    q, k, v = qkv(2, 4, 2, 13, skv=17, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 13, 17, generator=g) < 0.8
    bias = torch.randn(1, 4, 13, 17, generator=g, dtype=q.dtype)
    weights = _routed(2, 4, 13, 2, seed=4).requires_grad_()
    assert_matches_reference("moh", q, k, v, causal=causal, mask=mask, bias=bias, grads=(weights,),
                             head_weights=weights)


def test_no_weights_is_softmax_attention() -> None:
    q, k, v = qkv(2, 4, 2, 9)
    want = az.attention(q, k, v, causal=True)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(az.attention(q, k, v, method="moh", causal=True, backend=backend), want)


def test_a_zero_weight_gets_no_gradient_a_routed_one_gets_its_heads_output() -> None:
    q, k, v = qkv(1, 2, 2, 5)
    weights = torch.tensor([[[1.0, 0.0, 2.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 3.0]]], dtype=q.dtype)
    for backend in ("torch", "reference"):
        w = weights.clone().requires_grad_()
        out = az.attention(q, k, v, method="moh", backend=backend, head_weights=w)
        (grad,) = torch.autograd.grad(out.sum(), w)
        heads = az.attention(q, k, v).sum(-1)
        torch.testing.assert_close(grad, torch.where(weights != 0, heads, 0.0))


def test_bad_head_weights_are_refused_naming_them() -> None:
    q, k, v = qkv(2, 4, 2, 9)
    with pytest.raises(AttnzooError, match="^head_weights: expected a tensor of shape \\(2, 4, 9\\)"):
        az.attention(q, k, v, method="moh", head_weights=torch.ones(2, 9, 4, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="^head_weights: expected a floating-point tensor"):
        az.attention(q, k, v, method="moh", head_weights=torch.ones(2, 4, 9, dtype=torch.long))


def test_routing_keeps_top_k_renormalised_to_k() -> None:
    logits = torch.randn(3, 11, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = moh.route(logits, 2)
    assert r.weights.shape == (3, 11, 6)
    assert bool(((r.weights != 0).sum(-1) == 2).all()) and torch.equal(r.selected, r.weights != 0)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((3, 11), 2.0, dtype=torch.float64))
    top = logits.topk(2, dim=-1)
    kept = torch.softmax(top.values, dim=-1) * 2  # renormalising the kept softmax = a softmax over the kept logits
    torch.testing.assert_close(r.weights.gather(-1, top.indices), kept)


def test_routing_shared_heads_come_first_scaled_by_the_two_group_balance() -> None:
    g = torch.Generator().manual_seed(1)
    routed, shared, groups = (torch.randn(4, 7, n, generator=g, dtype=torch.float64) for n in (5, 3, 2))
    r = moh.route(routed, 2, shared_heads=3, shared_logits=shared, group_logits=groups)
    alpha = 2 * torch.softmax(groups, dim=-1)
    torch.testing.assert_close(r.weights[..., :3], alpha[..., :1] * 3 * torch.softmax(shared, dim=-1))
    torch.testing.assert_close(r.weights[..., 3:], alpha[..., 1:] * moh.route(routed, 2).weights)
    one = moh.route(routed, 2, shared_heads=1, group_logits=groups)
    torch.testing.assert_close(one.weights[..., 0], alpha[..., 0])  # a single shared head: constant gate 1


def test_load_balance_loss_is_the_papers() -> None:
    logits = torch.randn(2, 50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = moh.route(logits, 1)
    p = torch.softmax(logits, dim=-1).reshape(-1, 4)
    f = torch.nn.functional.one_hot(p.argmax(-1), 4).double().mean(0)
    torch.testing.assert_close(r.balance_loss, 4 * (f * p.mean(0)).sum())
    tied = moh.route(torch.zeros(8, 4, dtype=torch.float64), 2)  # every token keeps heads 0 and 1: f = (1, 1, 0, 0)
    assert float(tied.balance_loss) == pytest.approx(4 * (0.25 + 0.25))
