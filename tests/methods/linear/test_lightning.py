"""L2 Lightning attention: the gradient of a learnable per-head decay against the reference."""

from __future__ import annotations

import torch

import attnzoo as az
from tests.helpers import F64, qkv


def test_learnable_decay_gradient_matches_reference() -> None:
    q, k, v = qkv(1, 4, 2, 21, 4, 3, seed=2)
    decay = torch.tensor([0.0, 0.1, 0.5, 2.0], dtype=F64, requires_grad=True)
    grads = []
    for backend in ("reference", "torch"):
        out = az.attention(q, k, v, method="lightning", causal=True, backend=backend, decay=decay, block_size=4)
        grads.append(torch.autograd.grad(out.square().sum(), decay)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-9, rtol=1e-8)
