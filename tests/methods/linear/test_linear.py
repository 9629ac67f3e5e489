"""L1 linear attention: noncausal and cross lengths against the reference, and the softmax kernel
(random features) approximating softmax better with more features."""

from __future__ import annotations

import torch

import attnzoo as az
from tests.helpers import qkv


def test_noncausal_and_cross() -> None:
    q, _, _ = qkv(2, 4, 2, 9, 6, 5)
    _, k, v = qkv(2, 4, 2, 23, 6, 5, seed=4)
    for fm in ("elu1", "softmax_kernel"):
        ref = az.attention(q, k, v, method="linear", feature_map=fm, backend="reference")
        fast = az.attention(q, k, v, method="linear", feature_map=fm, backend="torch")
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)


def test_softmax_kernel_approximates_softmax() -> None:
    q, k, v = qkv(1, 2, 2, 64, 16, 16, seed=5)
    q, k = 0.5 * q, 0.5 * k
    exact = az.attention(q, k, v, method="softmax")
    rel = {}
    for m in (16, 1024):
        approx = az.attention(q, k, v, method="linear", feature_map="softmax_kernel", num_features=m)
        rel[m] = float((approx - exact).norm() / exact.norm())
    # measured over seeds 0-4: 0.07-0.10 with 1024 features, 0.31-0.47 with 16
    assert rel[1024] < 0.15
    assert rel[1024] < rel[16]
