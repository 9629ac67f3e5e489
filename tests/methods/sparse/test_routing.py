"""D5 routing: balanced clusters are each centroid's top-w queries and keys, a query averages the clusters it is in
(none: 0), causality by position, determinism, the fast path against the reference (every pattern, GQA, cross
lengths, windows, forward and backward), the online k-means update, the nn layer owning the centroids, bad parameters
and at_density."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.routing import SPEC, clusters, normalise, update_centroids
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv


def _axis_centroids(heads: int, dim: int, axes: list[int]) -> torch.Tensor:
    mu = torch.zeros(heads, len(axes), dim, dtype=F64)
    for c, axis in enumerate(axes):
        mu[:, c, axis] = 1.0
    return mu


def test_clusters_are_each_centroids_top_w_queries_and_keys_sorted():
    q, k, _ = qkv(1, 1, 1, 12, seed=1)
    mu = torch.randn(1, 3, 8, dtype=F64)
    queries, keys = clusters(q, k, mu)  # w = ⌈12 / 3⌉ = 4
    assert queries.shape == keys.shape == (1, 1, 3, 4)
    for x, members in ((q, queries), (k, keys)):
        r = normalise(x[0, 0].float()) @ mu[0].float().T  # (12, 3)
        for c in range(3):
            assert members[0, 0, c].tolist() == sorted(r[:, c].topk(4).indices.tolist())


def test_window_sets_the_cluster_size_clamped_to_the_sequence():
    q, k, _ = qkv(2, 2, 1, 10, skv=30, seed=2)
    queries, keys = clusters(q, k, torch.randn(2, 4, 8), window=12)
    assert queries.shape == (2, 2, 4, 10) and keys.shape == (2, 2, 4, 12)


def test_a_query_averages_its_clusters_and_a_query_in_none_gets_zero():
    n = 8
    q, k, v = qkv(1, 1, 1, n, 4, seed=3)
    mu = torch.randn(1, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    queries, keys = clusters(q, k, mu, window=3)
    out = az.attention(q, k, v, method="routing", centroids=mu, window=3, backend="torch")
    holding = [[c for c in range(3) if i in queries[0, 0, c].tolist()] for i in range(n)]
    assert any(len(cs) > 1 for cs in holding) and any(not cs for cs in holding)
    for i, cs in enumerate(holding):
        want = torch.zeros(4, dtype=F64)
        for c in cs:
            js = keys[0, 0, c]
            want += torch.softmax(q[0, 0, i] @ k[0, 0, js].T / 2, dim=0) @ v[0, 0, js] / len(cs)
        torch.testing.assert_close(out[0, 0, i], want)


def test_causal_reads_no_later_key_or_value():
    q, k, v = qkv(1, 2, 1, 30, seed=5, requires_grad=True)
    out = az.attention(q, k, v, method="routing", causal=True, centroids=torch.randn(2, 3, 8, dtype=F64))
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_deterministic_given_centroids_and_seed():
    q, k, v = qkv(2, 4, 2, 40, seed=6, dtype=torch.float32)
    mu = torch.randn(4, 5, 8)
    a, b = (az.attention(q, k, v, method="routing", causal=True, centroids=mu) for _ in range(2))
    assert torch.equal(a, b)
    c, d = (az.attention(q, k, v, method="routing", num_clusters=5, seed=3) for _ in range(2))
    assert torch.equal(c, d)
    assert not torch.equal(c, az.attention(q, k, v, method="routing", num_clusters=5, seed=4))


@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "c", "window", "causal"),
                         [(2, 4, 2, 33, 33, 4, None, True), (2, 4, 2, 33, 33, 4, None, False),
                          (1, 2, 1, 7, 33, 3, 5, True), (1, 2, 1, 33, 7, 3, None, True),
                          (2, 2, 2, 1, 40, 5, None, False), (1, 3, 1, 60, 60, 6, 9, True)])
def test_torch_matches_reference(b, h, hkv, sq, skv, c, window, causal):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=7, requires_grad=True)
    mu = torch.randn(h, c, 8, dtype=F64)
    assert_matches_reference("routing", q, k, v, causal=causal, centroids=mu, window=window)


def test_one_cluster_of_everything_is_softmax_attention():
    q, k, v = qkv(2, 4, 2, 20, seed=8)
    out = az.attention(q, k, v, method="routing", causal=True, num_clusters=1)
    want = az.attention(q, k, v, method="softmax", causal=True, backend="reference")
    torch.testing.assert_close(out, want)


def test_update_moves_each_centroid_to_the_mean_of_its_members():
    q, k, _ = qkv(2, 2, 1, 16, seed=9)
    mu = _axis_centroids(2, 8, [0, 1, 0])  # centroid 2 ties with centroid 0, which wins: no member
    x = normalise(torch.cat([q, k.expand(2, 2, 16, 8)], dim=2))
    nearest = (x @ mu.transpose(-1, -2)).argmax(-1)
    moved = update_centroids(mu, q, k, decay=0.0)
    for h in range(2):
        for c in range(2):
            members = x[:, h][nearest[:, h] == c]
            torch.testing.assert_close(moved[h, c], members.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved[:, 2], mu[:, 2])
    torch.testing.assert_close(update_centroids(mu, q, k, decay=1.0), mu)
    half = update_centroids(mu, q, k, decay=0.5)
    torch.testing.assert_close(half[:, :2], (mu[:, :2] + moved[:, :2]) / 2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("decay", [-0.1, 1.5, "0.9"])
def test_update_rejects_a_bad_decay(decay):
    q, k, _ = qkv(1, 2, 2, 8)
    with pytest.raises(AttnzooError, match="decay"):
        update_centroids(torch.randn(2, 3, 8), q, k, decay=decay)


def test_the_nn_layer_owns_the_centroids_and_they_learn_by_update():
    torch.manual_seed(0)
    layer = az.nn.Attention(dim=32, heads=4, kv_heads=2, method="routing", causal=True, num_clusters=3)
    centroids = layer.learnable["centroids"]
    assert centroids.shape == (4, 3, 8)
    x = torch.randn(2, 24, 32)
    layer(x).sum().backward()
    assert centroids.grad is None  # routing is a discrete choice: the centroids learn by k-means only
    q = layer.q_proj(x).view(2, 24, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(2, 24, 2, 8).transpose(1, 2)
    with torch.no_grad():
        centroids.copy_(update_centroids(centroids, q, k, decay=0.9))
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize(("params", "name"), [({"centroids": torch.randn(3, 4, 8)}, "centroids"),
                                              ({"centroids": torch.randn(2, 4, 5)}, "centroids"),
                                              ({"window": 0}, "window"), ({"num_clusters": 0}, "num_clusters")])
def test_bad_parameters_name_the_argument(params, name):
    q, k, v = qkv(1, 2, 2, 16)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="routing", **params)


@pytest.mark.parametrize(("n", "fraction"), [(1024, 1 / 4), (2048, 1 / 8), (4096, 1 / 16)])
def test_at_density_reads_about_the_fraction(n, fraction):
    call = Call(1, 2, 2, n, n, 16, 16, causal=False, device=torch.device("cpu"), dtype=F64, requires_grad=False,
                has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    _, keys = clusters(*qkv(1, 2, 2, n, 16, seed=10)[:2], torch.randn(2, params["num_clusters"], 16))
    assert keys.shape[-1] / n == pytest.approx(fraction, rel=0.05)
