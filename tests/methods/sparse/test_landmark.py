"""D4 landmark: the grouped softmax against the paper's formula computed token by token, landmarks carrying no value,
retrieval of the planted block, the selection's shape and causality, retrieval of every block = the training form,
fast paths against the reference (fp64, GQA, ragged tails, forward and backward), decoding, determinism, bad
parameters and at_density."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.landmark import SPEC, select
from attnzoo.registry import Call
from tests.helpers import F64, assert_decodes, assert_matches_reference, qkv


def _by_the_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                    retrieved: list[list[int]] | None) -> torch.Tensor:
    """One head, token by token: the top-level softmax over the own block's regular tokens up to the query and the
    landmarks of the retrieved past blocks (all past blocks if ``retrieved`` is None), each landmark's weight spread
    over its block's regular tokens by the in-block softmax."""
    n, period = q.shape[0], block_size + 1
    out = torch.zeros(n, v.shape[-1], dtype=q.dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    for i in range(n):
        c = i // period
        own = [j for j in range(c * period, i + 1) if j % period != block_size]
        blocks = range(c) if retrieved is None else retrieved[i]
        logits = [scale * q[i] @ k[j] for j in own] + [scale * q[i] @ k[b * period + block_size] for b in blocks]
        top = torch.softmax(torch.stack(logits), dim=0)
        for w, j in zip(top[: len(own)], own, strict=True):
            out[i] += w * v[j]
        for w, b in zip(top[len(own):], blocks, strict=True):
            members = list(range(b * period, b * period + block_size))
            inside = torch.softmax(torch.stack([scale * q[i] @ k[j] for j in members]), dim=0)
            out[i] += w * (inside @ v[members])
    return out


@pytest.mark.parametrize(("n", "block_size", "top_k"), [(23, 3, None), (23, 3, 2), (17, 1, 1), (12, 5, None)])
def test_the_paper_formula_token_by_token(n, block_size, top_k):
    q, k, v = qkv(1, 1, 1, n, seed=1)
    sel = select(q, k, block_size=block_size, top_k=top_k)
    own = torch.arange(n) // (block_size + 1)
    retrieved = [[int(b) for b in sel.indices[0, 0, i] if 0 <= b < own[i]] for i in range(n)]
    want = _by_the_formula(q[0, 0], k[0, 0], v[0, 0], block_size, None if top_k is None else retrieved)
    for backend in ("reference", "torch"):
        out = az.attention(q, k, v, method="landmark", causal=True, backend=backend, block_size=block_size,
                           top_k=top_k)
        torch.testing.assert_close(out[0, 0], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("top_k", [None, 2])
def test_landmark_values_are_never_read(top_k):
    q, k, v = qkv(1, 2, 2, 30, seed=2)
    bumped = v.clone()
    bumped[:, :, 3::4] += 100.0  # every landmark of block_size 3
    a, b = (az.attention(q, k, x, method="landmark", causal=True, block_size=3, top_k=top_k) for x in (v, bumped))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_retrieves_the_block_whose_landmark_matches_the_query():
    n, block_size, d = 40, 4, 8
    q, k, _ = qkv(1, 1, 1, n, d, seed=3)
    k[0, 0, 2 * 5 + 4] = 0.0
    k[0, 0, 2 * 5 + 4, 0] = 50.0  # the landmark of block 2
    q[0, 0, :, 0] = 1.0
    sel = select(q, k, block_size=block_size, top_k=1)
    for i in range(15, n):  # queries after block 2: own block and block 2
        assert {int(b) for b in sel.indices[0, 0, i] if b >= 0} == {i // 5, 2}


def test_selection_own_block_top_k_past_and_no_future():
    q, k, _ = qkv(2, 4, 2, 45, seed=4)
    sel = select(q, k, block_size=5, top_k=2)  # blocks of 6 positions
    own = (torch.arange(45) // 6).view(1, 1, -1, 1)
    assert sel.block_q == 1 and sel.block_k == 6 and sel.indices.shape == (2, 4, 45, 3)
    assert bool((sel.indices == own).any(-1).all())
    assert bool(((sel.indices <= own) | (sel.indices == -1)).all())
    assert torch.equal((sel.indices >= 0).sum(-1), torch.clamp(own[..., 0] + 1, max=3).expand(2, 4, 45))


def test_retrieving_every_block_is_the_training_form():
    q, k, v = qkv(2, 4, 2, 33, seed=5)
    full = az.attention(q, k, v, method="landmark", causal=True, block_size=3, top_k=None)
    every = az.attention(q, k, v, method="landmark", causal=True, block_size=3, top_k=9)
    torch.testing.assert_close(every, full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("top_k", [None, 2])
def test_no_output_depends_on_a_later_token(top_k):
    q, k, v = qkv(1, 2, 1, 30, seed=6, requires_grad=True)
    out = az.attention(q, k, v, method="landmark", causal=True, backend="torch", block_size=3, top_k=top_k)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 40, seed=7, dtype=torch.float32)
    for top_k in (None, 2):
        a, b = (az.attention(q, k, v, method="landmark", causal=True, block_size=4, top_k=top_k) for _ in range(2))
        assert torch.equal(a, b)
    assert torch.equal(select(q, k, block_size=4, top_k=2).indices, select(q, k, block_size=4, top_k=2).indices)


@pytest.mark.parametrize(("b", "h", "hkv", "n", "block_size", "top_k"),
                         [(2, 4, 2, 37, 4, None), (2, 4, 2, 37, 4, 2), (1, 2, 1, 23, 2, 1), (2, 6, 3, 50, 5, None),
                          (1, 2, 2, 9, 1, 3), (1, 1, 1, 5, 7, None), (1, 2, 2, 5, 7, 1)])
def test_torch_matches_reference(b, h, hkv, n, block_size, top_k):
    q, k, v = qkv(b, h, hkv, n, seed=8, requires_grad=True)
    assert_matches_reference("landmark", q, k, v, causal=True, block_size=block_size, top_k=top_k)


def test_training_form_in_many_chunks_matches_reference(monkeypatch):
    from attnzoo.methods.sparse import landmark
    monkeypatch.setattr(landmark, "CHUNK_ELEMENTS", 256)  # 4 query rows per chunk, checkpointed
    q, k, v = qkv(1, 2, 1, 29, seed=9, requires_grad=True)
    assert_matches_reference("landmark", q, k, v, causal=True, block_size=3)


@pytest.mark.parametrize("top_k", [None, 2])
def test_decoding_ragged_prompts_equals_the_causal_forward(top_k):
    q, k, v = qkv(3, 4, 2, 26, seed=10)
    assert_decodes("landmark", q, k, v, [5, 11, 8], block_size=3, top_k=top_k)


def test_decoding_a_chunk_equals_the_causal_forward():
    q, k, v = qkv(2, 2, 1, 24, seed=11)
    want = az.attention(q, k, v, method="landmark", causal=True, backend="reference", block_size=2, top_k=2)
    out, state = az.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], method="landmark", block_size=2, top_k=2)
    out, state = az.step(state, q[:, :, 10:24], k[:, :, 10:24], v[:, :, 10:24])
    torch.testing.assert_close(out, want[:, :, 10:24])


@pytest.mark.parametrize("params", [{"block_size": 0}, {"block_size": 2.5}, {"top_k": 0}, {"top_k": "3"},
                                    {"top_k": 5, "block_size": 3}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 16)  # 4 blocks of 4 positions with block_size 3
    name = "top_k" if "top_k" in params else "block_size"
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="landmark", causal=True, **params)


def test_noncausal_is_refused():
    q, k, v = qkv(1, 2, 2, 8)
    with pytest.raises(AttnzooError):
        az.attention(q, k, v, method="landmark", causal=False, block_size=3)


@pytest.mark.parametrize(("n", "fraction"), [(1024, 1 / 4), (2048, 1 / 8), (4096, 1 / 16)])
def test_at_density_reads_about_the_fraction(n, fraction):
    call = Call(1, 2, 2, n, n, 16, 16, causal=True, device=torch.device("cpu"), dtype=F64, requires_grad=False,
                has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    q, k, _ = qkv(1, 2, 2, n, 16, seed=12)
    sel = select(q, k, **params)
    seen = (sel.dense(2) & torch.ones(n, n, dtype=torch.bool).tril()).sum() / (2 * n * (n + 1) / 2)
    assert fraction / 2 < float(seen) < fraction * 2


@pytest.mark.parametrize("top_k", [None, 2])
def test_strided_inputs_whose_length_fills_the_blocks(top_k):
    """(B, S, H, D) memory, as a layer's projections give, and a length that needs no padding (a padded copy would
    have been contiguous)."""
    q, k, v = qkv(2, 4, 2, 24, seed=21)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    params = {"block_size": 3, "top_k": top_k}
    torch.testing.assert_close(az.attention(*strided, method="landmark", causal=True, backend="torch", **params),
                               az.attention(q, k, v, method="landmark", causal=True, backend="reference", **params))
