"""The block-sparse kernel (radial attention's block path): the CPU flash Function in many chunks (GQA, a partial
key block, a text tail, a user mask with an empty row, a bias, low precision), the autograd fallback, and
return_lse (values and gradients through both outputs)."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.kernels import block_sparse
from attnzoo.kernels.dense import softmax_attention_lse
from tests.helpers import assert_low_precision_close, assert_matches_reference, assert_same_out_and_lse, qkv


def test_block_sparse_flash_backward_in_many_chunks(monkeypatch):
    # CPU, D == Dv: the flash Function serves forward and backward, one chunk per run (tiny gather budget); GQA, a
    # partial last key block (131 keys, blocks of 4), a dense text tail, a user mask with an empty row and a bias
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the autograd fallback ran")

    monkeypatch.setattr(block_sparse, "_autograd_blocks", no_fallback)
    n = 16 * 8 + 3
    params = dict(layout=(16, 8), text_tokens=3, block_size=4, dense_first_frame=True)
    q, k, v = qkv(2, 4, 2, n, requires_grad=True)
    assert_matches_reference("radial", q, k, v, **params)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, n, n, generator=g) > 0.4
    mask[:, :, 5, :] = False  # a video row that sees nothing: zeros, zero gradients
    bias = torch.randn(1, 4, n, n, generator=g, dtype=torch.float64)
    assert_matches_reference("radial", q, k, v, mask=mask, bias=bias, **params)
    assert_matches_reference("radial", q, k, v, bias=bias, **params)  # a bias alone (no per-row emptiness)
    out = az.attention(q, k, v, method="radial", mask=mask, backend="torch", **params)
    assert bool((out[:, :, 5] == 0).all())
    assert_low_precision_close("radial", q, k, v, **params)  # fp32 and bf16 go through the same kernel


def test_block_sparse_autograd_fallback(monkeypatch):
    # a bias that needs a gradient, and Dv != D, take the autograd path (chunks checkpointed): still exact
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    n = 8 * 8 + 2
    q, k, _ = qkv(1, 4, 2, n, requires_grad=True)
    v = torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, n, n, dtype=torch.float64, requires_grad=True)
    assert_matches_reference("radial", q, k, v, bias=bias, grads=(bias,), layout=(8, 8), text_tokens=2, block_size=4)


def test_block_sparse_attention_returns_the_lse(monkeypatch):
    # a layout over the first 24 of 27 queries (a dense tail), a partial last key block, GQA, a user mask with an
    # empty row, many chunks: (out, lse) and the gradients through both equal dense attention over the same keys
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    n, bs = 27, 4
    q, k, v = qkv(2, 4, 2, n, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    blocks = torch.rand(6, 7, generator=g) < 0.5
    blocks[1] = False  # a query block that sees nothing
    mask = torch.rand(2, 1, n, n, generator=g) > 0.3
    mask[:, :, 9] = False
    seen = torch.ones(n, n, dtype=torch.bool)
    seen[:24] = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:, :n]
    layout = block_sparse.BlockLayout(blocks, bs)
    got = block_sparse.block_sparse_attention(q, k, v, scale=0.3, layout=layout, mask=mask, return_lse=True)
    want = softmax_attention_lse(q, k, v, 0.3, seen & mask, None)
    assert bool(torch.isneginf(want[1][:, :, 4:8]).all())
    assert_same_out_and_lse(got, want, (q, k, v))
