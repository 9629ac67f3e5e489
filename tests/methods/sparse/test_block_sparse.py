"""D0 block_sparse: the attend kernel over hand-built selections against the masked dense reference (forward and
backward): empty and full selections, ragged tails, different selections per batch and head, GQA-shared and
head-shared selections, causal inside blocks, user mask and bias, FlexAttention through the block-mask converter,
errors, and return_lse on both schedules (values and gradients through out and lse)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels import block_sparse
from attnzoo.kernels.selection import BlockSelection, random_selection, topk_blocks
from tests.helpers import assert_lse_matches_reference, assert_matches_reference, qkv


def _selection(blocks: torch.Tensor, sq: int, skv: int, bq: int, bk: int) -> BlockSelection:
    return BlockSelection.from_blocks(blocks, block_q=bq, block_k=bk, seq_q=sq, seq_kv=skv)


def test_empty_selection_gives_zeros_and_zero_gradients():
    q, k, v = qkv(2, 4, 2, 20, requires_grad=True)
    sel = _selection(torch.zeros(2, 4, 3, 3, dtype=torch.bool), 20, 20, 8, 8)
    out = az.attention(q, k, v, method="block_sparse", backend="torch", selection=sel)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_full_selection_is_dense_attention(causal):
    q, k, v = qkv(2, 4, 2, 21, skv=21)
    sel = _selection(torch.ones(2, 1, 3, 6, dtype=torch.bool), 21, 21, 8, 4)
    out = az.attention(q, k, v, method="block_sparse", backend="torch", selection=sel, causal=causal)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("b", "h", "hkv", "hs", "sq", "skv", "bq", "bk", "causal"),
    [
        (2, 4, 2, 4, 37, 29, 8, 4, True),  # per query head, ragged tails, cross causal
        (2, 4, 2, 2, 37, 29, 8, 4, False),  # GQA-group shared
        (1, 4, 4, 1, 64, 64, 16, 16, True),  # one selection for every head
        (2, 6, 2, 6, 33, 50, 8, 16, True),  # more keys than queries, block_k > block_q
        (3, 2, 1, 2, 9, 9, 1, 3, False),  # one-query blocks
        # key-block-major schedule (block_k >= 4 block_q): per-token selections, GQA-shared, cross, ragged tails
        (2, 4, 2, 4, 23, 23, 1, 4, True),
        (2, 4, 2, 2, 19, 30, 1, 5, True),
        (1, 6, 3, 1, 21, 17, 2, 8, False),
    ],
)
def test_torch_matches_masked_dense_reference(b, h, hkv, hs, sq, skv, bq, bk, causal):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, requires_grad=True)
    g = torch.Generator().manual_seed(b * 100 + sq)
    blocks = torch.rand(b, hs, -(-sq // bq), -(-skv // bk), generator=g) < 0.5
    assert_matches_reference("block_sparse", q, k, v, causal=causal, selection=_selection(blocks, sq, skv, bq, bk))


def test_selections_differ_per_batch_and_head():
    q, k, v = qkv(2, 2, 2, 16)
    blocks = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    blocks[0, 0, :, 0] = blocks[0, 1, :, 1] = blocks[1, 0, :, 1] = blocks[1, 1, :, 0] = True
    out = az.attention(q, k, v, method="block_sparse", backend="torch", selection=_selection(blocks, 16, 16, 8, 8))
    for b, h, half in ((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)):
        keys = slice(8 * half, 8 * half + 8)
        want = torch.softmax(q[b, h] @ k[b, h, keys].T / 8**0.5, dim=-1) @ v[b, h, keys]
        torch.testing.assert_close(out[b, h], want)


def test_user_mask_and_bias_and_rows_that_see_nothing():
    q, k, v = qkv(2, 4, 2, 30, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, 30, 30, generator=g) > 0.3
    mask[:, :, 3] = False
    bias = torch.randn(1, 4, 30, 30, generator=g, dtype=torch.float64, requires_grad=True)
    sel = random_selection(2, 4, density=0.5, block_q=4, block_k=8, seq_q=30, seq_kv=30, generator=g)
    assert_matches_reference("block_sparse", q, k, v, causal=True, mask=mask, bias=bias, grads=(bias,),
                             selection=sel)
    out = az.attention(q, k, v, method="block_sparse", backend="torch", causal=True, mask=mask, selection=sel)
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_causality_never_violated():
    """Changing a key after a query never changes that query's output, whatever the selection."""
    q, k, v = qkv(1, 2, 2, 24, dtype=torch.float64)
    sel = _selection(torch.ones(1, 2, 3, 3, dtype=torch.bool), 24, 24, 8, 8)
    out = az.attention(q, k, v, method="block_sparse", backend="torch", causal=True, selection=sel)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13:] += 5
    v2[:, :, 13:] -= 3
    out2 = az.attention(q, k2, v2, method="block_sparse", backend="torch", causal=True, selection=sel)
    torch.testing.assert_close(out[:, :, :13], out2[:, :, :13], atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_gives_the_same_result(causal):
    q, k, v = qkv(2, 4, 2, 40, dtype=torch.float32)
    scores = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(6))
    sel = topk_blocks(scores, 2, causal=causal, seq_q=40, seq_kv=40, block_q=8, block_k=8)
    want = az.attention(q, k, v, method="block_sparse", backend="reference", selection=sel, causal=causal)
    got = az.attention(q, k, v, method="block_sparse", backend="flex", selection=sel, causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_selection_is_named():
    q, k, v = qkv(1, 2, 1, 16)
    with pytest.raises(AttnzooError, match="selection"):
        az.attention(q, k, v, method="block_sparse")
    sel = _selection(torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, 16, 8, 8)
    with pytest.raises(AttnzooError, match="selection"):
        az.attention(q[:, :, :12], k, v, method="block_sparse", selection=sel)
    with pytest.raises(AttnzooError, match="selection"):
        az.attention(q, k, v, method="block_sparse", selection=sel.indices)


@pytest.mark.parametrize(("h", "hkv", "sq", "skv"), [(4, 2, 40, 40), (2, 2, 24, 40), (4, 1, 37, 37), (2, 1, 29, 45)])
def test_causal_own_block_selections_match_reference(h, hkv, sq, skv):
    """The shape MoBA builds (own/diagonal block always selected, causal): the kernel's shared triangle logits."""
    q, k, v = qkv(2, h, hkv, sq, skv=skv, requires_grad=True)
    nq, nk = -(-sq // 8), -(-skv // 8)
    diagonal = torch.arange(nk) == ((torch.arange(nq) * 8 + skv - sq) // 8).unsqueeze(1)
    scores = torch.rand(2, h, nq, nk, generator=torch.Generator().manual_seed(7))
    sel = topk_blocks(scores, min(3, nk), causal=True, always=diagonal, seq_q=sq, seq_kv=skv, block_q=8, block_k=8)
    assert_matches_reference("block_sparse", q, k, v, causal=True, selection=sel)


@pytest.mark.parametrize(
    ("h", "hkv", "sq", "skv", "bq", "bk", "dv", "own"),
    [
        (4, 2, 23, 23, 1, 4, 8, True),  # MoBA's shape: the causal diagonal blocks as one call, GQA, ragged tail
        (4, 2, 19, 30, 1, 5, 8, False),  # masked and unmasked key groups, cross causal, rows that see nothing
        (2, 1, 21, 21, 2, 8, 5, False),  # Dv != D: the autograd groups
    ],
)
def test_key_major_schedule_returns_the_lse(h, hkv, sq, skv, bq, bk, dv, own):
    q, k, v = qkv(2, h, hkv, sq, dv=dv, skv=skv, requires_grad=True)
    nq, nk = -(-sq // bq), -(-skv // bk)
    g = torch.Generator().manual_seed(sq)
    blocks = torch.rand(2, h, nq, nk, generator=g) < 0.4
    blocks[0, 0, 1] = False  # a query block that selects nothing
    if own:
        blocks |= torch.arange(nk) == ((torch.arange(nq) * bq + skv - sq) // bk).unsqueeze(1)
    assert_lse_matches_reference("block_sparse", q, k, v, causal=True, selection=_selection(blocks, sq, skv, bq, bk))


@pytest.mark.parametrize("dv", [8, 5])
def test_query_major_schedule_returns_the_lse_in_many_chunks(monkeypatch, dv):
    # one chunk per unit; a user mask with an empty row; Dv = D: the flash Function, else the autograd chunks
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    q, k, v = qkv(2, 4, 2, 30, dv=dv, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, 30, 30, generator=g) > 0.3
    mask[:, :, 3] = False
    sel = random_selection(2, 4, density=0.5, block_q=4, block_k=8, seq_q=30, seq_kv=30, generator=g)
    assert_lse_matches_reference("block_sparse", q, k, v, causal=True, mask=mask, selection=sel)
    assert_lse_matches_reference("block_sparse", q, k, v, causal=False, selection=sel)
