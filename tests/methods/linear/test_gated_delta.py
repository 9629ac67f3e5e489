"""L10 gated delta rule: the gradients of the per-token gates against the reference."""

from __future__ import annotations

import torch

import attnzoo as az
from tests.helpers import qkv, with_gates


def test_gate_gradients_match_reference() -> None:
    q, k, v = qkv(2, 4, 2, 19, 5, 3, seed=8)
    params = with_gates({"gates": True}, 2, 4, 19)
    gates = (params["log_gate"].requires_grad_(True), params["beta"].requires_grad_(True))
    grads = []
    for backend in ("reference", "torch"):
        out = az.attention(q, k, v, method="gated_delta", causal=True, backend=backend, chunk_size=4, **params)
        grads.append(torch.autograd.grad(out.square().sum(), gates))
    for g_fast, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=1e-8)
