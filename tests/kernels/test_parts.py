"""part_attention: one key part's output and log-sum-exp equal dense attention on every route (flash with GQA
folded, batch-shared part, causal square and bottom-right, values narrower than keys, autograd), and an empty part
weighs nothing."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kernels.parts import part_attention
from tests.helpers import assert_same_out_and_lse


def _dense(q, k, v, scale, causal):
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None
    return softmax_attention_lse(q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1), scale, mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("dv", [8, 5])  # values narrower than keys: the dense route
@pytest.mark.parametrize(("sq", "sk", "causal", "kv_batch"), [
    (5, 9, False, 3), (5, 9, False, 1), (6, 6, True, 3), (4, 9, True, 3), (1, 9, True, 3),
])
def test_equals_dense_attention(dtype, hkv, dv, sq, sk, causal, kv_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, sq, 8, generator=g, dtype=dtype)
    k, v = torch.randn(kv_batch, hkv, sk, 8, generator=g, dtype=dtype), torch.randn(kv_batch, hkv, sk, dv,
                                                                                 generator=g, dtype=dtype)
    out, lse = part_attention(q, k, v, 0.3, causal=causal)
    want_out, want_lse = _dense(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_gradients_flow_through_the_log_sum_exp():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert_same_out_and_lse(part_attention(q, k, v, 0.3, causal=True), _dense(q, k, v, 0.3, True), (q, k, v))


def test_an_empty_part_gives_zero_and_minus_infinity():
    out, lse = part_attention(torch.randn(2, 4, 3, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 5), 0.3)
    assert out.shape == (2, 4, 3, 5) and not out.any()
    assert bool((lse == float("-inf")).all())
