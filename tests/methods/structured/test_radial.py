"""P7 radial attention: the fast paths (block, token union, tiled) against the dense reference beyond the conformance
suite's 1-D shapes, in many chunks and at low precision, the union path's parts cover the rule exactly once,
FlexAttention, and parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels import block_sparse, union
from attnzoo.masks.radial import radial
from attnzoo.methods.structured import radial as radial_method
from tests.helpers import assert_low_precision_close, assert_matches_reference, dense_mask, qkv


@pytest.mark.parametrize(
    "params",
    [dict(layout=(12, 5, 5)), dict(layout=(9, 4, 8), text_tokens=12, dense_first_frame=True), dict(),
     dict(layout=(25, 5), text_tokens=5),
     dict(layout=(12, 5, 5), block_size=4), dict(layout=(25, 12), block_size=8, decay_factor=0.5),
     dict(layout=(9, 4, 8), text_tokens=12, dense_first_frame=True, block_size=8, decay_factor=0.2),
     dict(layout=(64, 4), text_tokens=6, block_size=3)],
)
@pytest.mark.parametrize("return_lse", [False, True])
def test_radial_torch_matches_reference(params, return_lse):
    n = math.prod(params.get("layout", (65,))) + params.get("text_tokens", 0)
    q, k, v = qkv(2, 4, 2, n, requires_grad=True)
    assert_matches_reference("radial", q, k, v, return_lse=return_lse, **params)


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("return_lse", [False, True])
def test_radial_user_mask_and_bias(block_size, return_lse):
    q, k, v = qkv(1, 2, 1, 70, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 1, 70, 70, generator=g) > 0.3
    mask[..., 2, :] = False
    mask[..., 69, :] = False
    bias = torch.randn(1, 2, 70, 70, generator=g, dtype=torch.float64)
    assert_matches_reference("radial", q, k, v, mask=mask, bias=bias, layout=(8, 2, 4), text_tokens=6,
                             block_size=block_size, return_lse=return_lse)


def test_radial_block_path_in_many_chunks(monkeypatch):
    # tiny gather budget: every run is its own chunk
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    q, k, v = qkv(2, 4, 2, 8 * 16 + 3, requires_grad=True)
    assert_matches_reference("radial", q, k, v, layout=(16, 8), text_tokens=3, block_size=4, dense_first_frame=True)


@pytest.mark.parametrize("frames, spatial, text, first", [
    (1, 5, 0, True), (2, 3, 2, False), (9, 5, 3, True), (40, 3, 2, False), (33, 70, 0, True), (17, 1, 2, True),
    (64, 16, 1, False), (20, 64, 0, True)])
def test_radial_token_parts_are_disjoint_and_cover_the_rule(frames, spatial, text, first):
    # the union path's parts, counted pair by pair: every (video query, key) pair the rule keeps exactly once, no other
    n = frames * spatial + text
    count = torch.zeros(n, n, dtype=torch.long)
    for part in radial_method._parts((frames, spatial, text, first)):
        for group in part:
            shape = (group.q.shape[0], group.q.shape[1], group.k.shape[1])
            seen = torch.ones(shape, dtype=torch.bool) if group.mask is None else group.mask.expand(shape)
            qi, ki = group.q.unsqueeze(2).expand(shape), group.k.unsqueeze(1).expand(shape)
            seen = seen & (qi >= 0)
            count.index_put_((qi[seen], ki[seen]), torch.ones(int(seen.sum()), dtype=torch.long), accumulate=True)
    want = dense_mask(radial(frames, spatial, text, first, "cpu"), n).long()
    want[frames * spatial :] = 0  # text rows run as plain SDPA, outside the parts
    assert torch.equal(count, want)


def test_radial_token_union_path_in_many_chunks(monkeypatch):
    # CPU, D == Dv, no user mask/bias: the union kernel serves forward and backward (never the tiled path); one tile
    # per chunk (tiny gather budget); GQA, text, the sink, tiles with padded queries (70 positions per frame)
    monkeypatch.setattr(union, "GATHER_BYTES", 1)

    def no_tiles(*args, **kwargs):
        raise AssertionError("the tiled path ran")

    monkeypatch.setattr(radial_method, "tiled_attention", no_tiles)
    params = dict(layout=(9, 70), text_tokens=3, dense_first_frame=True)
    q, k, v = qkv(2, 4, 2, 9 * 70 + 3, requires_grad=True)
    assert_matches_reference("radial", q, k, v, **params)
    assert_low_precision_close("radial", q, k, v, **params)


def test_radial_token_rule_other_head_dims_take_the_tiled_path():
    # Dv != D (the CPU flash kernel wants equal head dims): the tiled path, still exact
    q, k, _ = qkv(1, 4, 2, 8 * 6 + 2, requires_grad=True)
    v = torch.randn(1, 2, 8 * 6 + 2, 5, dtype=torch.float64, requires_grad=True)
    assert_matches_reference("radial", q, k, v, layout=(8, 6), text_tokens=2, dense_first_frame=True)

@pytest.mark.flex
def test_radial_flex_matches_reference():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 2, 200, requires_grad=True))
    for extra in ({}, {"block_size": 16}):
        kw = dict(method="radial", layout=(12, 4, 4), text_tokens=8, dense_first_frame=True, **extra)
        torch.testing.assert_close(az.attention(q, k, v, backend="flex", **kw),
                                   az.attention(q, k, v, backend="reference", **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("params", "needle"),
    [(dict(layout=(5, 7)), "layout"), (dict(layout=(2, 2, 2, 6)), "layout"), (dict(text_tokens=48), "text_tokens"),
     (dict(text_tokens=-1), "text_tokens"), (dict(layout=(4, 10), text_tokens=7), "layout"),
     (dict(block_size=0), "block_size"), (dict(decay_factor=0.5), "decay_factor"),
     (dict(layout=(3, 16), block_size=17), "block_size"), (dict(block_size=2), "block_size"),
     (dict(layout=(3, 16), block_size=4, decay_factor=0.0), "decay_factor")],
)
def test_radial_errors(params, needle):
    q = torch.randn(1, 2, 48, 8)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, q, q, method="radial", **params)
