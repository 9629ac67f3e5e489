"""The chunked linear scan: groups of chunks carry the running state across group borders, forward and backward."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.kernels import linear_scan
from tests.helpers import decoding


@pytest.mark.parametrize("method", ["linear", "lightning", "nala"])
def test_many_chunk_groups_match_reference_with_state_and_grads(method, monkeypatch):
    """Groups of chunks carry the running state across group borders (scores budget forced to 1–2 chunks/group), in
    the forward and in the hand-written backward (feature maps recomputed per group for linear and nala)."""
    monkeypatch.setattr(linear_scan, "SCORES_BUDGET", 2 * 2 * 4 * 8 * 8 - 1)  # B·H·C² per chunk: one chunk per group
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 45, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 45, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 45, 6, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"block_size": 8} if method == "lightning" else {"chunk_size": 8}
    out = az.attention(q, k, v, method=method, causal=True, backend="torch", **kw)
    ref = az.attention(q, k, v, method=method, causal=True, backend="reference", **kw)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    for normalize in (True, False) if method == "linear" else ():  # inference: feature maps applied per group
        with torch.no_grad():
            got = az.attention(q, k, v, method=method, causal=True, backend="torch", normalize=normalize, **kw)
            want = az.attention(q, k, v, method=method, causal=True, backend="reference", normalize=normalize, **kw)
        torch.testing.assert_close(got, want)
    module = decoding(method)
    with torch.no_grad():
        _, state = module.prefill(q, k, v, **kw)
        s = None
        for t in range(45):
            _, s = module.step(s, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], **kw)
    torch.testing.assert_close(state, s)
