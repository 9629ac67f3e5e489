"""part_attention: one key part's output and log-sum-exp equal dense attention on every route (flash with GQA
folded, batch-shared part, causal square and bottom-right, values narrower than keys, autograd), and an empty part
weighs nothing."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import parts
from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kernels.parts import part_attention
from tests.helpers import assert_same_out_and_lse, one_thread


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


@pytest.mark.parametrize("hkv", [4, 2])
def test_a_visibility_mask_with_an_empty_row_equals_dense(hkv):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, hkv, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    seen = torch.rand(3, 1, 5, 9, generator=g) < 0.6
    seen[:, :, 1] = False
    out, lse = part_attention(q, k, v, 0.3, causal=True, seen=seen)
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)
    want_out, want_lse = softmax_attention_lse(q, k, v, 0.3, seen & causal)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()


def test_the_onednn_route_of_a_shared_part_equals_dense(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not built into this torch")
    monkeypatch.setattr(parts, "GEMM_MIN_SCORES", 1)
    monkeypatch.setattr(parts, "GEMM_SCORES", 3 * 9)  # chunks of 3 rows
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 2, 8, generator=g)
    k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(2))
    assert not parts.onednn_fits(q.reshape(1, 2, 12, 8), k, v) or torch.get_num_threads() == 1
    with one_thread():
        assert parts.onednn_fits(q.reshape(1, 2, 12, 8), k, v)
        out, lse = part_attention(q, k, v, 0.3)
    want_out, want_lse = _dense(q.double(), k.double(), v.double(), 0.3, False)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
