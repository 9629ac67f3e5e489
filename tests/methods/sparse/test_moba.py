"""D1 moba: the routing rule on hand-built keys (the chosen blocks are the known ones), the own block always chosen,
no future block, causality, determinism, the fast path against the reference (fp64, GQA, ragged tails, forward and
backward), decoding over ragged prompts, and bad parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.moba import select
from tests.helpers import F64, assert_decodes, assert_matches_reference, qkv


def _planted(n: int = 32, block: int = 4, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One head: key block ``b`` has mean ``(b + 1)·e_0`` except blocks 2 and 5, whose mean is ``10·e_1``; a query
    along ``e_1 + 0.01·e_0`` therefore prefers blocks 2 and 5, then the latest past blocks."""
    k = torch.zeros(1, 1, n, d, dtype=F64)
    for b in range(n // block):
        k[0, 0, b * block: (b + 1) * block, 0] = b + 1.0
    for b in (2, 5):
        k[0, 0, b * block: (b + 1) * block] = 0.0
        k[0, 0, b * block: (b + 1) * block, 1] = 10.0
    q = torch.zeros(1, 1, n, d, dtype=F64)
    q[0, 0, :, 1] = 1.0
    q[0, 0, :, 0] = 0.01
    return q, k


def _chosen(indices: torch.Tensor) -> set[int]:
    return {int(i) for i in indices if i >= 0}


def test_selects_the_planted_blocks_and_the_own_block():
    q, k = _planted()
    sel = select(q, k, block_size=4, top_k=3)
    assert sel.block_q == 1 and sel.indices.shape == (1, 1, 32, 3)
    assert _chosen(sel.indices[0, 0, 31]) == {7, 2, 5}  # own block 7 + the two planted ones
    assert _chosen(sel.indices[0, 0, 25]) == {6, 2, 5}
    assert _chosen(sel.indices[0, 0, 22]) == {5, 2, 4}  # own block 5 (planted), block 2, then the best other past
    assert _chosen(sel.indices[0, 0, 9]) == {2, 1, 0}  # own block 2: only two past blocks exist
    assert _chosen(sel.indices[0, 0, 2]) == {0}  # the first block: nothing in the past


def test_own_block_always_chosen_and_no_future_block():
    q, k, _ = qkv(2, 4, 2, 45, seed=3)
    sel = select(q, k, block_size=6, top_k=3)
    pos = torch.arange(45)
    own = (pos // 6).view(1, 1, -1, 1)
    idx = sel.indices
    assert bool((idx == own).any(-1).all())
    assert bool(((idx <= own) | (idx == -1)).all())
    # as many blocks as exist up to the own block, at most top_k
    assert torch.equal((idx >= 0).sum(-1), torch.clamp(pos // 6 + 1, max=3).expand(2, 4, 45))


def test_top_k_one_is_block_diagonal_causal_attention():
    q, k, v = qkv(1, 2, 2, 20, seed=1)
    out = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=5, top_k=1)
    pos = torch.arange(20)
    mask = (pos.view(-1, 1) // 5 == pos.view(1, -1) // 5) & (pos.view(1, -1) <= pos.view(-1, 1))
    want = az.attention(q, k, v, method="softmax", backend="reference", mask=mask)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_enough_blocks_is_full_causal_attention():
    q, k, v = qkv(2, 4, 2, 23, seed=2)
    out = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=4, top_k=6)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_causal_no_output_depends_on_a_later_token():
    q, k, v = qkv(1, 2, 1, 30, seed=4, requires_grad=True)
    out = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=4, top_k=3)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 40, seed=5, dtype=torch.float32)
    a = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=8, top_k=2)
    b = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=8, top_k=2)
    assert torch.equal(a, b)
    assert torch.equal(select(q, k, block_size=8, top_k=2).indices, select(q, k, block_size=8, top_k=2).indices)


@pytest.mark.parametrize(("b", "h", "hkv", "n", "block", "top_k"),
                         [(2, 4, 2, 37, 5, 3), (1, 2, 2, 16, 4, 2), (2, 6, 3, 50, 7, 4), (1, 2, 1, 9, 1, 3)])
def test_torch_matches_reference(b, h, hkv, n, block, top_k):
    q, k, v = qkv(b, h, hkv, n, seed=6, requires_grad=True)
    assert_matches_reference("moba", q, k, v, causal=True, block_size=block, top_k=top_k)


def test_decoding_ragged_prompts_equals_the_causal_forward():
    q, k, v = qkv(3, 4, 2, 26, seed=7)
    assert_decodes("moba", q, k, v, [5, 11, 8], block_size=4, top_k=3)


def test_decoding_a_chunk_equals_the_causal_forward():
    q, k, v = qkv(2, 2, 1, 24, seed=8)
    want = az.attention(q, k, v, method="moba", causal=True, backend="reference", block_size=3, top_k=2)
    out, state = az.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], method="moba", block_size=3, top_k=2)
    out, state = az.step(state, q[:, :, 10:24], k[:, :, 10:24], v[:, :, 10:24])
    torch.testing.assert_close(out, want[:, :, 10:24])


@pytest.mark.parametrize("params", [{"block_size": 0}, {"block_size": 2.5}, {"top_k": 0}, {"top_k": "3"},
                                    {"block_size": 4, "top_k": 3}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 8)
    name = list(params)[-1]
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="moba", causal=True, **params)


def test_a_prompt_shorter_than_top_k_blocks_decodes():
    q, k, v = qkv(1, 2, 1, 12, seed=9)
    want = az.attention(q, k, v, method="moba", causal=True, backend="reference", block_size=2, top_k=5)
    out, state = az.prefill(q[:, :, :4], k[:, :, :4], v[:, :, :4], method="moba", block_size=2, top_k=5)
    out, state = az.step(state, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])
    torch.testing.assert_close(out, want[:, :, 4:])


def test_noncausal_is_refused():
    q, k, v = qkv(1, 2, 2, 8)
    with pytest.raises(AttnzooError):
        az.attention(q, k, v, method="moba", causal=False, block_size=4, top_k=2)


def _conv(hkv: int, d: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(hkv, d, width, dtype=F64, generator=torch.Generator().manual_seed(seed)) / width


def test_identity_key_convolution_is_plain_moba_and_a_shift_is_the_previous_key():
    q, k, v = qkv(2, 4, 2, 21, seed=10)
    identity = torch.zeros(2, k.shape[-1], 3, dtype=F64)
    identity[..., -1] = 1
    plain = az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=4, top_k=3)
    torch.testing.assert_close(az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=4,
                                            top_k=3, key_conv=identity), plain, atol=1e-12, rtol=1e-12)
    shift = torch.zeros_like(identity)
    shift[..., 0] = 1  # k'_t = k_{t-2}: the keys moved two places later, zeros first
    moved = torch.nn.functional.pad(k, (0, 0, 2, 0))[:, :, :21]
    torch.testing.assert_close(az.attention(q, k, v, method="moba", causal=True, backend="torch", block_size=4,
                                            top_k=3, key_conv=shift),
                               az.attention(q, moved, v, method="moba", causal=True, backend="torch", block_size=4,
                                            top_k=3), atol=1e-12, rtol=1e-12)


def test_key_convolution_matches_reference_with_its_gradient():
    q, k, v = qkv(2, 4, 2, 26, seed=11, requires_grad=True)
    weight = _conv(2, k.shape[-1], 3).requires_grad_(True)
    assert_matches_reference("moba", q, k, v, causal=True, grads=(weight,), block_size=5, top_k=3, key_conv=weight)


def test_key_convolution_decodes_ragged_prompts_and_chunks():
    q, k, v = qkv(3, 4, 2, 22, seed=12)
    assert_decodes("moba", q, k, v, [4, 9, 1], block_size=3, top_k=3, key_conv=_conv(2, k.shape[-1], 4))
    weight = _conv(2, k.shape[-1], 2, seed=1)
    want = az.attention(q, k, v, method="moba", causal=True, backend="reference", block_size=3, top_k=2,
                        key_conv=weight)
    _, state = az.prefill(q[:, :, :7], k[:, :, :7], v[:, :, :7], method="moba", block_size=3, top_k=2,
                          key_conv=weight)
    out, _ = az.step(state, q[:, :, 7:], k[:, :, 7:], v[:, :, 7:])
    torch.testing.assert_close(out, want[:, :, 7:])


def test_the_layer_learns_a_key_convolution_that_starts_as_the_identity():
    layer = az.nn.Attention(32, 4, kv_heads=2, method="moba", causal=True, block_size=4, top_k=2)
    weight = layer.learnable["key_conv"]
    assert weight.shape == (2, 8, 3) and bool((weight[..., -1] == 1).all()) and bool((weight[..., :-1] == 0).all())
    x = torch.randn(2, 12, 32)
    plain = az.nn.Attention(32, 4, kv_heads=2, method="moba", causal=True, block_size=4, top_k=2, key_conv=None)
    plain.load_state_dict({n: p for n, p in layer.state_dict().items() if "key_conv" not in n})
    torch.testing.assert_close(layer(x), plain(x))
    layer(x).square().sum().backward()
    assert weight.grad is not None and bool(weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("weight", [torch.zeros(2, 8), torch.zeros(3, 8, 2), torch.zeros(2, 7, 2),
                                    torch.zeros(2, 8, 0)])
def test_bad_key_convolution_is_named(weight):
    q, k, v = qkv(1, 4, 2, 12)
    with pytest.raises(AttnzooError, match="key_conv"):
        az.attention(q, k, v, method="moba", causal=True, block_size=4, top_k=2, key_conv=weight)
