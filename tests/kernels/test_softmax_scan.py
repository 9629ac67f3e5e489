"""The cumulative-softmax scan: every prefix equals a softmax over it (several recursion levels, several chunk groups,
broadcast heads, with and without autograd), the combine is associative, a scan continues exactly from the state it
returns, large scores do not overflow, and prefixes that see nothing give 0 and −inf with finite gradients."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import softmax_scan
from attnzoo.kernels.softmax_scan import ScanState, combine, prefix_attention

F64 = torch.float64


def cumulative_softmax(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_t, lse_t)`` by one softmax per prefix, a loop over positions."""
    s, v = torch.broadcast_tensors(s.unsqueeze(-1), v)
    s = s[..., 0]
    outs = [torch.softmax(s[..., : t + 1], -1).unsqueeze(-2) @ v[..., : t + 1, :] for t in range(s.shape[-1])]
    lses = [torch.logsumexp(s[..., : t + 1], -1) for t in range(s.shape[-1])]
    return torch.cat(outs, -2), torch.stack(lses, -1)


@pytest.mark.parametrize("grad", [False, True])
def test_every_prefix_is_a_softmax_over_it(grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softmax_scan, "GROUP_BUDGET", 64)  # a few chunks per group: many groups
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 3, 70, generator=g, dtype=F64)).requires_grad_(grad)  # 70 -> 18 -> 5 -> 2 at chunk 4
    v = torch.randn(2, 1, 70, 5, generator=g, dtype=F64)  # broadcast over the 3 "query heads"
    want_out, want_lse = cumulative_softmax(s.detach(), v)
    for chunk in (4, 64, 128):
        out, lse, whole = prefix_attention(s, v, chunk=chunk)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(lse, want_lse)
        torch.testing.assert_close(whole.m + torch.log(whole.u), want_lse[..., -1])


def test_combine_is_associative() -> None:
    g = torch.Generator().manual_seed(1)
    a, b, c = (ScanState(5 * torch.randn(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 0.1,
                         torch.randn(4, 3, generator=g, dtype=F64)) for _ in range(3))
    left, right = combine(combine(a, b), c), combine(a, combine(b, c))
    for x, y in zip(left, right, strict=True):
        torch.testing.assert_close(x, y)


def test_a_scan_continues_from_the_state_it_returns() -> None:
    g = torch.Generator().manual_seed(2)
    s, v = torch.randn(2, 50, generator=g, dtype=F64), torch.randn(2, 50, 4, generator=g, dtype=F64)
    out, lse, whole = prefix_attention(s, v, chunk=8)
    head = prefix_attention(s[:, :21], v[:, :21], chunk=8)
    tail = prefix_attention(s[:, 21:], v[:, 21:], initial=head[2], chunk=8)
    torch.testing.assert_close(torch.cat([head[0], tail[0]], 1), out)
    torch.testing.assert_close(torch.cat([head[1], tail[1]], 1), lse)
    for x, y in zip(tail[2], whole, strict=True):
        torch.testing.assert_close(x, y)


def test_large_scores_do_not_overflow_in_fp32() -> None:
    g = torch.Generator().manual_seed(3)
    s = 1e4 * torch.randn(1, 300, generator=g, dtype=F64)
    v = torch.randn(1, 300, 2, generator=g, dtype=F64)
    out, lse, _ = prefix_attention(s.float(), v.float(), chunk=16)
    want_out, want_lse = cumulative_softmax(s, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-2, rtol=1e-6)


def test_prefixes_that_see_nothing_give_zero_and_minus_inf_with_finite_gradients() -> None:
    hidden = float("-inf")
    s = torch.tensor([[hidden] * 5 + [0.5, -1.0, hidden, 2.0] * 3], dtype=F64, requires_grad=True)
    v = torch.randn(1, s.shape[1], 3, dtype=F64, requires_grad=True)
    out, lse, _ = prefix_attention(s, v, chunk=4)
    assert bool((out[:, :5] == 0).all()) and bool(torch.isneginf(lse[:, :5]).all())
    torch.testing.assert_close(out[:, 5:], cumulative_softmax(s.detach()[:, 5:], v.detach()[:, 5:])[0])
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    (out.sum() + finite.sum()).backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(s.grad).all()
    assert bool((s.grad[torch.isinf(s.detach())] == 0).all())
