"""P11, P13, P14 (local family, second work stream): predicates and position ids against explicit loops, fast paths
against the dense references beyond the conformance shapes, and parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.masks import dense
from attnzoo.masks.groups import latent_groups
from attnzoo.masks.positional import concentric_position_ids, position_causal


def qkv(b: int, h: int, hkv: int, s: int, d: int = 8, dv: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, dv))
    return tuple(torch.randn(*x, generator=g, dtype=torch.float64).requires_grad_() for x in shapes)


def assert_matches_reference(method: str, q, k, v, causal=False, mask=None, bias=None, grads=(), **params):
    ref = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="reference", **params)
    out = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="torch", **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(ref)
    inputs = (q, k, v, *grads)
    for a, b in zip(torch.autograd.grad(out, inputs, cot), torch.autograd.grad(ref, inputs, cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---- P13 concentric causal attention -------------------------------------------------------------------------------


def brute_concentric_ids(seq: int, h: int, w: int, start: int) -> list[int]:
    """Peel the grid ring by ring (outermost first), as the paper's figure numbers it; text around it counts on."""
    ring = [[-1] * w for _ in range(h)]
    top, left, bottom, right, r = 0, 0, h - 1, w - 1, 0
    while top <= bottom and left <= right:
        for y in range(top, bottom + 1):
            for x in range(left, right + 1):
                if y in (top, bottom) or x in (left, right):
                    ring[y][x] = r
        top, left, bottom, right, r = top + 1, left + 1, bottom - 1, right - 1, r + 1
    ids = list(range(start)) + [start + ring[y][x] for y in range(h) for x in range(w)]
    return ids + [start + r + t for t in range(seq - start - h * w)]


@pytest.mark.parametrize(("seq", "h", "w", "start"), [(40, 6, 6, 2), (24, 24, 1, 0), (30, 3, 7, 5), (20, 5, 4, 0),
                                                      (9, 1, 1, 8)])
def test_concentric_ids_and_mask_match_loops(seq, h, w, start):
    ids = concentric_position_ids(seq, (h, w), start)
    assert ids.tolist() == brute_concentric_ids(seq, h, w, start)
    got = dense(position_causal(ids, ids), 1, 1, seq, seq, "cpu")[0, 0]
    want = torch.tensor([[ids[j] <= ids[i] for j in range(seq)] for i in range(seq)])
    assert torch.equal(got, want)


def test_concentric_ids_24x24_as_in_the_paper():
    ids = concentric_position_ids(576 + 10, (24, 24), 5)
    grid = ids[5:581].view(24, 24)
    assert grid[0].eq(5).all() and grid[11:13, 11:13].eq(5 + 11).all()
    assert ids[581:].tolist() == list(range(5 + 12, 5 + 12 + 5))
    assert torch.equal(concentric_position_ids(7, None), torch.arange(7))


@pytest.mark.parametrize("params", [dict(layout=(16, 20), image_start=37), dict(layout=(3, 130), image_start=0),
                                    dict(layout=None)])
def test_concentric_torch_matches_reference(params):
    q, k, v = qkv(2, 4, 2, 400)
    assert_matches_reference("concentric_causal", q, k, v, causal=True, **params)


def test_concentric_user_mask_bias_and_empty_rows():
    q, k, v = qkv(2, 4, 2, 300)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 300, 300, generator=g) > 0.3
    mask[..., 7, :] = False
    bias = torch.randn(1, 4, 300, 300, generator=g, dtype=torch.float64)
    assert_matches_reference("concentric_causal", q, k, v, causal=True, mask=mask, bias=bias, layout=(12, 12),
                             image_start=100)
    out = az.attention(q, k, v, method="concentric_causal", causal=True, mask=mask, layout=(12, 12))
    assert out[:, :, 7].abs().max() == 0


@pytest.mark.parametrize(("params", "name"), [(dict(layout=(5, 5), image_start=10), "layout"),
                                              (dict(layout=(5,)), "layout"), (dict(layout=(0, 3)), "layout"),
                                              (dict(image_start=-1), "image_start")])
def test_concentric_errors(params, name):
    q, k, v = qkv(1, 2, 2, 30)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="concentric_causal", causal=True, **params)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="concentric_causal", layout=(2, 2))


# ---- P14 varied-size window attention --------------------------------------------------------------------------------


def test_varied_window_with_zero_regression_is_window_attention():
    q, k, v = qkv(2, 4, 2, 12 * 15, dv=6)
    zero = torch.zeros(4, 8, 4, dtype=torch.float64)
    want = az.attention(q, k, v, method="maxvit_block", window_size=(4, 5), layout=(12, 15))
    for backend in ("torch", "reference"):
        for reg in (None, zero):
            got = az.attention(q, k, v, method="varied_window", window_size=(4, 5), layout=(12, 15),
                               window_regression=reg, backend=backend)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("layout", "window"), [((12, 15), (4, 5)), ((6, 6), 3), (None, 6)])
def test_varied_window_torch_matches_reference(layout, window):
    q, k, v = qkv(2, 4, 2, 180 if layout != (6, 6) else 36, dv=6)
    reg = (0.4 * torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
           ).requires_grad_()
    assert_matches_reference("varied_window", q, k, v, grads=(reg,), layout=layout, window_size=window,
                             window_regression=reg)


def test_varied_window_nn_layer_owns_the_regression():
    layer = az.nn.Attention(32, 4, method="varied_window", window_size=3, layout=(6, 6))
    assert tuple(layer.learnable["window_regression"].shape) == (4, 8, 4)
    assert not layer.learnable["window_regression"].any()
    x = torch.randn(2, 36, 32)
    layer(x).square().sum().backward()
    assert layer.learnable["window_regression"].grad is not None


@pytest.mark.parametrize(("params", "name"), [(dict(layout=(5, 7)), "layout"), (dict(window_size=(4, 4), layout=(6, 6)),
                                              "window_size"), (dict(window_size=(2, 2, 2)), "window_size"),
                                              (dict(window_regression=torch.zeros(2, 8, 3)), "window_regression")])
def test_varied_window_errors(params, name):
    q, k, v = qkv(1, 2, 2, 36)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="varied_window", **{"window_size": 3, **params})


# ---- P12 local + global latent attention (FIT) --------------------------------------------------------------------


@pytest.mark.parametrize(("data", "groups", "latents"), [(12, 3, 2), (10, 5, 0), (6, 1, 3), (9, 3, 1)])
def test_latent_groups_predicate_matches_loops(data, groups, latents):
    n = data + groups * latents
    size = data // groups

    def group(t: int) -> tuple[bool, int]:
        return (False, t // size) if t < data else (True, (t - data) // latents)

    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            (li, gi), (lj, gj) = group(i), group(j)
            want[i, j] = gi == gj or (li and lj)
    assert torch.equal(dense(latent_groups(data, groups, latents), 1, 1, n, n, "cpu")[0, 0], want)


@pytest.mark.parametrize(("groups", "latents"), [(4, 3), (5, 0), (1, 6)])
def test_local_global_latent_torch_matches_reference(groups, latents):
    q, k, v = qkv(2, 4, 2, 200 + groups * latents, dv=6)
    assert_matches_reference("local_global_latent", q, k, v, num_groups=groups, latents_per_group=latents)


@pytest.mark.parametrize(("params", "name"), [(dict(num_groups=7), "num_groups"),
                                              (dict(num_groups=3, latents_per_group=2), "latents_per_group"),
                                              (dict(num_groups=2, latents_per_group=20), "latents_per_group"),
                                              (dict(num_groups=0), "num_groups")])
def test_local_global_latent_errors(params, name):
    q, k, v = qkv(1, 2, 2, 40)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="local_global_latent", **params)


# ---- P11 channel group attention (DaViT) ----------------------------------------------------------------------------


def test_channel_group_matches_per_group_loops_and_the_paper_formula():
    q, k, v = qkv(2, 6, 3, 50, d=8, dv=5)
    q2 = q[..., :40, :]
    scale = 0.3
    out = az.attention(q2, k, v, method="channel_group", scale=scale, backend="torch")
    for b in range(2):
        for h in range(6):
            vt, kk = v[b, h // 2].T, k[b, h // 2]  # DaViT code: softmax(k̃ᵀ ṽ) applied to q̃, roles renamed
            a = torch.softmax(scale * vt @ kk, dim=-1)
            torch.testing.assert_close(out[b, h], q2[b, h] @ a.T, atol=1e-12, rtol=1e-12)
    # The paper's softmax(Qᵀ K / sqrt(C_g)) Vᵀ, transposed back to (N, C_g), is the method with q and v swapped.
    qp, kp, vp = qkv(1, 2, 2, 30, d=8, seed=4)
    paper = (torch.softmax(qp.transpose(-1, -2) @ kp / 8**0.5, dim=-1) @ vp.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(az.attention(vp, kp, qp, method="channel_group"), paper, atol=1e-12, rtol=1e-12)


def test_channel_group_gradients_and_errors():
    q, k, v = qkv(2, 4, 2, 300, d=16, dv=12)
    assert_matches_reference("channel_group", q, k, v)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="channel_group", causal=True)
    with pytest.raises(AttnzooError, match="mask"):
        az.attention(q, k, v, method="channel_group", mask=torch.ones(300, 300, dtype=torch.bool))
