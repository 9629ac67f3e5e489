"""P3 generalized neighborhood, P9 long/short distance and P7 radial attention: brute-force predicate checks (explicit
loops over coordinates), fast paths against the dense reference beyond the conformance suite's 1-D shapes, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnzoo as az
from attnzoo import masks
from attnzoo.errors import AttnzooError
from attnzoo.kernels import block_sparse, union
from attnzoo.masks.neighborhood import generalized_neighborhood, neighborhood
from attnzoo.masks.partitions import window_partition
from attnzoo.masks.radial import radial, radial_blocks
from attnzoo.methods.structured import radial as radial_method


def qkv(b: int, h: int, hkv: int, n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, n, d), (b, hkv, n, d), (b, hkv, n, d))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)


def assert_matches_reference(method: str, q, k, v, causal=False, mask=None, bias=None, backend="torch", **params):
    ref = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="reference", **params)
    out = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend=backend, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def dense(mod, n: int) -> torch.Tensor:
    return masks.dense(mod, 1, 1, n, n, "cpu")[0, 0]


# --- P3 generalized neighborhood -------------------------------------------------------------------------------------

def gna_window(x: int, length: int, kernel: int, stride: int, dilation: int, causal: bool) -> set[int]:
    """GNA's keys of coordinate ``x`` on one axis, by listing its dilation group and its stride group's leader."""
    members = list(range(x % dilation, length, dilation))
    u = members.index(x)
    first = (u // stride) * stride
    if causal:
        leader = min(first + stride - 1, len(members) - 1)
        return {members[w] for w in range(len(members)) if w <= u and leader - w < kernel}
    leader = min(first + stride // 2, len(members) - 1)
    start = max(0, min(leader - kernel // 2, len(members) - kernel))
    return set(members[start : start + kernel])


def brute_gna(layout, kernel, stride, dilation, causal) -> torch.Tensor:
    coords = list(itertools.product(*(range(n) for n in layout)))
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, xq in enumerate(coords):
        windows = [gna_window(*a) for a in zip(xq, layout, kernel, stride, dilation, causal, strict=True)]
        for j, xk in enumerate(coords):
            out[i, j] = all(y in w for y, w in zip(xk, windows, strict=True))
    return out


GNA_CASES = [
    ((13,), (5,), (2,), (1,), (False,)),
    ((13,), (5,), (4,), (1,), (True,)),
    ((17,), (3,), (3,), (4,), (False,)),  # dilation not dividing the length, stride = kernel
    ((17,), (5,), (2,), (3,), (True,)),
    ((9,), (9,), (9,), (1,), (False,)),  # kernel equal to the length
    ((7, 10), (3, 5), (2, 5), (2, 1), (True, False)),
    ((4, 5, 6), (3, 3, 5), (3, 1, 2), (1, 2, 1), (False, True, False)),
]


@pytest.mark.parametrize(("layout", "kernel", "stride", "dilation", "causal"), GNA_CASES)
def test_gna_predicate_matches_brute_force(layout, kernel, stride, dilation, causal):
    n = math.prod(layout)
    got = dense(generalized_neighborhood(layout, kernel, stride, dilation, causal), n)
    assert torch.equal(got, brute_gna(layout, kernel, stride, dilation, causal))
    if not any(causal):  # every query still sees exactly Π k keys
        assert bool((got.sum(-1) == math.prod(kernel)).all())


def test_gna_stride_one_is_neighborhood_and_stride_kernel_is_blocked():
    layout, kernel, dilation = (6, 10), (3, 5), (2, 1)
    for causal in ((False, False), (True, False), (True, True)):
        assert torch.equal(dense(generalized_neighborhood(layout, kernel, (1, 1), dilation, causal), 60),
                           dense(neighborhood(layout, kernel, dilation, causal), 60))
    blocked = dense(generalized_neighborhood((6, 10), (3, 5), (3, 5), (1, 1), (False, False)), 60)
    assert torch.equal(blocked, dense(window_partition((6, 10), (3, 5)), 60))
    q, k, v = qkv(1, 2, 2, 60)
    kw = dict(kernel_size=(3, 5), dilation=(2, 1), layout=(6, 10))
    torch.testing.assert_close(az.attention(q, k, v, method="generalized_neighborhood", stride=1, **kw),
                               az.attention(q, k, v, method="neighborhood", **kw))


GNA_PARAMS = [
    dict(kernel_size=31, stride=4, dilation=3),  # 300 = 3 groups of 100; tiles of 128 → 128 (multiple of 4)
    dict(kernel_size=31, stride=31),  # blocked, tiles of 124
    dict(kernel_size=(5, 7), stride=(2, 3), dilation=(2, 1), layout=(15, 20)),
    dict(kernel_size=(5, 7), stride=(3, 2), layout=(15, 20), is_causal=(True, False)),
    dict(kernel_size=(3, 5, 3), stride=(2, 5, 3), dilation=(1, 1, 2), layout=(5, 6, 10)),
]


@pytest.mark.parametrize("params", GNA_PARAMS)
@pytest.mark.parametrize("causal", [False, True])
def test_gna_torch_matches_reference(params, causal):
    q, k, v = qkv(2, 4, 2, 300)
    assert_matches_reference("generalized_neighborhood", q, k, v, causal=causal, **params)


@pytest.mark.flex
def test_gna_flex_matches_reference():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 2, 300))
    kw = dict(method="generalized_neighborhood", kernel_size=(5, 7), stride=(2, 3), dilation=(2, 1), layout=(15, 20),
              is_causal=(True, False))
    torch.testing.assert_close(az.attention(q, k, v, backend="flex", **kw),
                               az.attention(q, k, v, backend="reference", **kw), atol=1e-5, rtol=1e-5)


def test_gna_user_mask_and_bias():
    q, k, v = qkv(1, 2, 1, 65)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 1, 65, 65, generator=g) > 0.3
    bias = torch.randn(1, 2, 65, 65, generator=g, dtype=torch.float64)
    assert_matches_reference("generalized_neighborhood", q, k, v, mask=mask, bias=bias, kernel_size=(3, 5),
                             stride=(2, 3), layout=(5, 13))


@pytest.mark.parametrize(
    ("params", "needle"),
    [(dict(kernel_size=5, stride=6), "stride"), (dict(kernel_size=4, stride=2), "kernel_size"),
     (dict(kernel_size=3, layout=(5, 7)), "layout"), (dict(kernel_size=(3, 3), stride=(1, 2, 1), layout=(6, 5)),
     "stride"), (dict(kernel_size=41), "kernel_size"), (dict(kernel_size=5, stride=0), "stride")],
)
def test_gna_errors(params, needle):
    q = torch.randn(1, 2, 30, 8)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, q, q, method="generalized_neighborhood", **params)


# --- P9 long/short distance attention (CrossFormer) -----------------------------------------------------------------

def brute_long_short(layout, distance: str, size) -> torch.Tensor:
    """Group each coordinate by listing: short → its block of ``size`` adjacent positions, long → its residue mod
    ``size``; same group on every axis."""
    coords = list(itertools.product(*(range(n) for n in layout)))

    def group(x: tuple[int, ...]) -> tuple[int, ...]:
        out = []
        for c, s in zip(x, size, strict=True):
            out.append(next(b for b in range(0, 10**6, s) if b <= c < b + s) if distance == "short"
                       else next(r for r in range(s) if (c - r) % s == 0))
        return tuple(out)

    return torch.tensor([[group(a) == group(b) for b in coords] for a in coords])


@pytest.mark.parametrize(
    ("layout", "distance", "size"),
    [((12,), "short", (3,)), ((12,), "long", (4,)), ((6, 8), "short", (3, 2)), ((6, 8), "long", (2, 4)),
     ((4, 6, 4), "long", (2, 3, 1)), ((4, 6, 4), "short", (2, 3, 4))],
)
def test_long_short_matches_brute_force_groups(layout, distance, size):
    n = math.prod(layout)
    q, k, v = qkv(2, 4, 2, n)
    kw = dict(method="long_short", distance=distance, layout=layout, group_size=size, interval=size)
    out = az.attention(q, k, v, **kw)
    want = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~brute_long_short(layout, distance, size), float("-inf")), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(az.attention(q, k, v, backend="reference", **kw), want)


def test_long_short_errors():
    q = torch.randn(1, 2, 48, 8)
    with pytest.raises(AttnzooError, match="group_size"):
        az.attention(q, q, q, method="long_short", group_size=(5, 2), layout=(6, 8))
    with pytest.raises(AttnzooError, match="interval"):
        az.attention(q, q, q, method="long_short", distance="long", interval=(2, 3), layout=(6, 8))
    with pytest.raises(AttnzooError, match="distance"):
        az.attention(q, q, q, method="long_short", distance="medium", group_size=4)
    # only the size the chosen distance uses is checked
    az.attention(q, q, q, method="long_short", distance="long", interval=(2, 4), group_size=5, layout=(6, 8))


def _check_low_precision(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **params: object) -> None:
    """fp32 and bf16 radial outputs close to the fp64 reference, with finite gradients."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        got = az.attention(*x, method="radial", backend="torch", **params)
        want = az.attention(q, k, v, method="radial", backend="reference", **params)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        got.float().square().sum().backward()
        assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in x)


# --- P7 radial attention ---------------------------------------------------------------------------------------------

def brute_token(frames: int, spatial: int, text: int, dense_first_frame: bool) -> torch.Tensor:
    """The paper's Sec. 4.1 rule written with explicit loops and floating-point log2 / ceil."""
    n = frames * spatial + text
    out = torch.zeros(n, n, dtype=torch.bool)
    for x, y in itertools.product(range(n), range(n)):
        if x >= frames * spatial or y >= frames * spatial:
            out[x, y] = True
            continue
        (i, k), (j, l) = divmod(x, spatial), divmod(y, spatial)
        r = math.floor(math.log2(max(abs(i - j), 1)))
        band = 2**r <= spatial and abs(k - l) + 1 <= spatial / 2**r
        sampled = abs(i - j) % math.ceil(2**r / spatial) == 0 and k == l
        out[x, y] = band or sampled or (dense_first_frame and j == 0)
    return out


def brute_blocks(frames: int, spatial: int, text: int, first: bool, block: int, decay: float) -> torch.Tensor:
    """The deployed block mask with loops: the released code's per-frame-pair rule, then the strict shrink per block."""
    video, n = frames * spatial, frames * spatial + text
    nb, nbv = math.ceil(n / block), video // block
    size = 2 ** math.ceil(math.log2(spatial + 1))  # 2^bitlen(s)

    def seen(x: int, y: int) -> bool:
        (i, k), (j, l) = divmod(x, spatial), divmod(y, spatial)
        d = abs(i - j)
        if first and j == 0:
            return True
        decay_length = size / (2 ** math.ceil(math.log2(d + 1)))  # P / 2^bitlen(d)
        if decay_length < block and d % math.floor(block / decay_length) != 0:
            return False
        return d <= 1 or abs(k - l) <= max(decay * decay_length, block)

    out = torch.ones(nb, nb, dtype=torch.bool)
    for a, b in itertools.product(range(nbv), range(nbv)):
        densities = [sum(seen(a * block + r, b * block + c) for r in range(block)) / block for c in range(block)]
        nonzero = sum(x > 0 for x in densities)
        high = sum(x > 1 / 3 for x in densities)
        out[a, b] = high / (nonzero + 1e-9) > 0.6
    return out


@pytest.mark.parametrize(
    ("frames", "spatial", "text", "first"),
    [(20, 1, 0, False), (9, 3, 0, False), (17, 8, 0, False), (6, 5, 3, True), (33, 2, 1, False)],
)
def test_radial_token_rule_matches_brute_force(frames, spatial, text, first):
    n = frames * spatial + text
    got = dense(radial(frames, spatial, text, first, "cpu"), n)
    assert torch.equal(got, brute_token(frames, spatial, text, first))


@pytest.mark.parametrize(
    ("frames", "spatial", "text", "first", "block", "decay"),
    [(24, 8, 0, False, 4, 1.0),   # aligned: one s×s mask per distance
     (20, 8, 5, True, 4, 0.5),    # aligned, sink and a partial text block
     (16, 12, 0, False, 4, 2.0),  # aligned, s not a power of two
     (30, 3, 2, False, 4, 1.0),   # blocks straddle frames
     (12, 6, 0, True, 4, 0.2)],
)
def test_radial_block_mask_matches_brute_force(frames, spatial, text, first, block, decay):
    assert torch.equal(radial_blocks(frames, spatial, text, first, block, decay),
                       brute_blocks(frames, spatial, text, first, block, decay))


def test_radial_block_mask_is_sparse_in_frames():
    # the paper's shape family: 128-blocks, s = 2B; at block level about 4 frames per octave of distance are kept
    density = [float(radial_blocks(f, 256, 0, False, 128, 1.0).float().mean()) for f in (32, 64, 128)]
    assert density[0] > density[1] > density[2] and density[2] < 0.2


@pytest.mark.parametrize(
    "params",
    [dict(layout=(12, 5, 5)), dict(layout=(9, 4, 8), text_tokens=12, dense_first_frame=True), dict(),
     dict(layout=(25, 5), text_tokens=5),
     dict(layout=(12, 5, 5), block_size=4), dict(layout=(25, 12), block_size=8, decay_factor=0.5),
     dict(layout=(9, 4, 8), text_tokens=12, dense_first_frame=True, block_size=8, decay_factor=0.2),
     dict(layout=(64, 4), text_tokens=6, block_size=3)],
)
def test_radial_torch_matches_reference(params):
    n = math.prod(params.get("layout", (65,))) + params.get("text_tokens", 0)
    q, k, v = qkv(2, 4, 2, n)
    assert_matches_reference("radial", q, k, v, **params)


@pytest.mark.parametrize("block_size", [None, 4])
def test_radial_user_mask_and_bias(block_size):
    q, k, v = qkv(1, 2, 1, 70)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 1, 70, 70, generator=g) > 0.3
    mask[..., 2, :] = False
    mask[..., 69, :] = False
    bias = torch.randn(1, 2, 70, 70, generator=g, dtype=torch.float64)
    assert_matches_reference("radial", q, k, v, mask=mask, bias=bias, layout=(8, 2, 4), text_tokens=6,
                             block_size=block_size)


def test_radial_block_path_in_many_chunks(monkeypatch):
    # tiny gather budget: every run is its own chunk
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    q, k, v = qkv(2, 4, 2, 8 * 16 + 3)
    assert_matches_reference("radial", q, k, v, layout=(16, 8), text_tokens=3, block_size=4, dense_first_frame=True)


def test_block_sparse_flash_backward_in_many_chunks(monkeypatch):
    # CPU, D == Dv: the flash Function serves forward and backward, one chunk per run (tiny gather budget); GQA, a
    # partial last key block (131 keys, blocks of 4), a dense text tail, a user mask with an empty row and a bias
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the autograd fallback ran")

    monkeypatch.setattr(block_sparse, "_autograd_blocks", no_fallback)
    n = 16 * 8 + 3
    params = dict(layout=(16, 8), text_tokens=3, block_size=4, dense_first_frame=True)
    q, k, v = qkv(2, 4, 2, n)
    assert_matches_reference("radial", q, k, v, **params)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, n, n, generator=g) > 0.4
    mask[:, :, 5, :] = False  # a video row that sees nothing: zeros, zero gradients
    bias = torch.randn(1, 4, n, n, generator=g, dtype=torch.float64)
    assert_matches_reference("radial", q, k, v, mask=mask, bias=bias, **params)
    assert_matches_reference("radial", q, k, v, bias=bias, **params)  # a bias alone (no per-row emptiness)
    out = az.attention(q, k, v, method="radial", mask=mask, backend="torch", **params)
    assert bool((out[:, :, 5] == 0).all())
    _check_low_precision(q, k, v, **params)  # fp32 and bf16 go through the same kernel


def test_block_sparse_autograd_fallback(monkeypatch):
    # a bias that needs a gradient, and Dv != D, take the autograd path (chunks checkpointed): still exact
    monkeypatch.setattr(block_sparse, "GATHER_BYTES", 1)
    n = 8 * 8 + 2
    params = dict(method="radial", layout=(8, 8), text_tokens=2, block_size=4)
    q, k, _ = qkv(1, 4, 2, n)
    v = torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, n, n, dtype=torch.float64, requires_grad=True)
    ref = az.attention(q, k, v, bias=bias, backend="reference", **params)
    out = az.attention(q, k, v, bias=bias, backend="torch", **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, bias), grad), torch.autograd.grad(ref, (q, k, v, bias), grad),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)



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
    want = dense(radial(frames, spatial, text, first, "cpu"), n).long()
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
    q, k, v = qkv(2, 4, 2, 9 * 70 + 3)
    assert_matches_reference("radial", q, k, v, **params)
    _check_low_precision(q, k, v, **params)


def test_radial_token_rule_other_head_dims_take_the_tiled_path():
    # Dv != D (the CPU flash kernel wants equal head dims): the tiled path, still exact
    q, k, _ = qkv(1, 4, 2, 8 * 6 + 2)
    v = torch.randn(1, 2, 8 * 6 + 2, 5, dtype=torch.float64, requires_grad=True)
    assert_matches_reference("radial", q, k, v, layout=(8, 6), text_tokens=2, dense_first_frame=True)

@pytest.mark.flex
def test_radial_flex_matches_reference():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 2, 200))
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
