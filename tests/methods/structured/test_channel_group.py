"""P11 channel group attention (DaViT): per-group loops and the paper's formula, gradients against the reference,
and causal/mask refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_matches_reference, qkv


def test_channel_group_matches_per_group_loops_and_the_paper_formula():
    q, k, v = qkv(2, 6, 3, 50, d=8, dv=5, requires_grad=True)
    q2 = q[..., :40, :]
    scale = 0.3
    out = az.attention(q2, k, v, method="channel_group", scale=scale, backend="torch")
    for b in range(2):
        for h in range(6):
            vt, kk = v[b, h // 2].T, k[b, h // 2]  # DaViT code: softmax(k̃ᵀ ṽ) applied to q̃, roles renamed
            a = torch.softmax(scale * vt @ kk, dim=-1)
            torch.testing.assert_close(out[b, h], q2[b, h] @ a.T, atol=1e-12, rtol=1e-12)
    # The paper's softmax(Qᵀ K / sqrt(C_g)) Vᵀ, transposed back to (N, C_g), is the method with q and v swapped.
    qp, kp, vp = qkv(1, 2, 2, 30, d=8, seed=4, requires_grad=True)
    paper = (torch.softmax(qp.transpose(-1, -2) @ kp / 8**0.5, dim=-1) @ vp.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(az.attention(vp, kp, qp, method="channel_group"), paper, atol=1e-12, rtol=1e-12)


def test_channel_group_gradients_and_errors():
    q, k, v = qkv(2, 4, 2, 300, d=16, dv=12, requires_grad=True)
    assert_matches_reference("channel_group", q, k, v)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="channel_group", causal=True)
    with pytest.raises(AttnzooError, match="mask"):
        az.attention(q, k, v, method="channel_group", mask=torch.ones(300, 300, dtype=torch.bool))
