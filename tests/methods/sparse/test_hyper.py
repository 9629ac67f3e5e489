"""D8 hyper: the sortLSH hash, the plan's weights against a plain per-query construction, the causal recursion's
structure (never a future key, exact leaves), exact limits (one block, short sequences), determinism by seed, the fast
path against the reference (fp64, GQA, cross, forward and backward, with and without gradients), at_density and bad
parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.hyper import SPEC, lsh_hash, plan, weights
from attnzoo.registry import Call
from tests.helpers import assert_matches_reference, qkv

PARAMS = {"block_size": 3, "sample_size": 4, "num_projections": 3, "min_seq_len": 2, "seed": 1}


def test_hash_is_the_gray_code_of_the_sign_bits():
    g = torch.Generator().manual_seed(0)
    x, directions = torch.randn(5, 7, 8, generator=g), torch.randn(8, 4, generator=g)
    got = lsh_hash(x, directions)
    bits = (x @ directions > 0).long()
    code = sum(bits[..., i] << i for i in range(4))
    assert torch.equal(got, code ^ (code >> 1))
    # buckets next to each other in the sorted order differ in one sign
    gray = torch.arange(16) ^ (torch.arange(16) >> 1)
    assert bool(((gray[1:] ^ gray[:-1]) & ((gray[1:] ^ gray[:-1]) - 1) == 0).all())  # a power of two: one bit


def _plain_weights(q: torch.Tensor, k: torch.Tensor, params: dict) -> torch.Tensor:
    """The noncausal weights of one plan, query by query in sorted order (module docstring, written plainly)."""
    p = plan(q, k, causal=False, **params).parts[0]
    b, h, sq, skv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    g = h // k.shape[1]
    w = torch.zeros(b, h, sq, skv, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            q_order, k_order = p.q_order[bi, hi, 0], p.k_order[bi, hi // g, 0]
            for r in range(sq):
                i, block = int(q_order[r]), r // p.q_block
                for c in range(skv):
                    if c // p.k_block == block:
                        w[bi, hi, i, int(k_order[c])] += 1
                for c in p.samples[bi, hi // g, 0].tolist():
                    if c // p.k_block != block:
                        w[bi, hi, i, int(k_order[c])] += p.weight
    return w


@pytest.mark.parametrize(("sq", "skv"), [(17, 17), (7, 19), (19, 7)])
def test_weights_equal_a_plain_per_query_construction(sq, skv):
    q, k, _ = qkv(2, 4, 2, sq, skv=skv, seed=3)
    got = weights(plan(q, k, causal=False, **PARAMS), (2, 4, sq, skv), q.device)
    torch.testing.assert_close(got, _plain_weights(q, k, PARAMS))
    assert bool((got > 0).sum(-1).ge(1).all())  # every query sees its diagonal block


def test_causal_recursion_structure():
    q, k, _ = qkv(1, 2, 1, 13, seed=4)
    p = plan(q, k, causal=True, **{**PARAMS, "min_seq_len": 4})
    assert p.leaf == 4  # 13 → 7 → 4 positions: two halvings
    assert [(part.q_start, part.stride, part.count, part.n_q) for part in p.parts] == [(8, 16, 1, 8), (4, 8, 2, 4)]
    w = weights(p, (1, 2, 13, 13), q.device)
    i, j = torch.arange(13).view(-1, 1), torch.arange(13)
    assert not bool((w[..., j > i] != 0).any())  # never a future key
    leaf = (i // 4 == j // 4) & (j <= i)
    assert bool((w[..., leaf] == 1).all())  # exact causal attention inside each leaf


@pytest.mark.parametrize("causal", [False, True])
def test_short_sequences_are_exact_attention(causal):
    q, k, v = qkv(2, 4, 2, 21, seed=5)
    out = az.attention(q, k, v, method="hyper", causal=causal, backend="torch", min_seq_len=22)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_one_block_is_exact_attention():
    q, k, v = qkv(2, 4, 2, 21, seed=6)
    out = az.attention(q, k, v, method="hyper", backend="torch", block_size=21, sample_size=5, min_seq_len=1)
    want = az.attention(q, k, v, method="softmax", backend="reference")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_causal_no_output_depends_on_a_later_token():
    q, k, v = qkv(1, 2, 1, 30, seed=7, requires_grad=True)
    out = az.attention(q, k, v, method="hyper", causal=True, backend="torch", **PARAMS)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_deterministic_for_a_seed():
    q, k, v = qkv(2, 4, 2, 40, seed=8, dtype=torch.float32)
    a = az.attention(q, k, v, method="hyper", causal=True, backend="torch", **PARAMS)
    b = az.attention(q, k, v, method="hyper", causal=True, backend="torch", **PARAMS)
    c = az.attention(q, k, v, method="hyper", causal=True, backend="torch", **{**PARAMS, "seed": 2})
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "causal", "params"), [
    (2, 4, 2, 37, 37, True, PARAMS),
    (1, 2, 2, 16, 16, False, {**PARAMS, "sample_size": 0}),
    (2, 6, 3, 9, 50, False, {"block_size": 4, "sample_size": 3, "min_seq_len": 1}),
    (1, 2, 1, 50, 9, False, {"block_size": 2, "sample_size": 6, "num_projections": 5, "min_seq_len": 3}),
    (1, 2, 1, 45, 45, True, {"block_size": 5, "sample_size": 2, "min_seq_len": 5, "seed": 3}),
])
def test_torch_matches_reference(b, h, hkv, sq, skv, causal, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=9, requires_grad=True)
    assert_matches_reference("hyper", q, k, v, causal=causal, **params)
    with torch.no_grad():  # the no-gradient path (fused kernels)
        out = az.attention(q, k, v, method="hyper", causal=causal, backend="torch", **params)
        want = az.attention(q, k, v, method="hyper", causal=causal, backend="reference", **params)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_at_density_reads_about_the_fraction(causal, fraction):
    n = 1024
    call = Call(1, 1, 1, n, n, 16, 16, causal=causal, device=torch.device("cpu"), dtype=torch.float32,
                requires_grad=False, has_mask=False, has_bias=False)
    params = {p.name: p.default for p in SPEC.params} | SPEC.at_density(call, fraction)
    for p in SPEC.params:
        p.validate(params[p.name], call)
    q, k, _ = qkv(1, 1, 1, n, 16, seed=10)
    seen = (weights(plan(q, k, causal=causal, **params), (1, 1, n, n), q.device) > 0).double().mean()
    may_see = (n + 1) / (2 * n) if causal else 1.0
    assert abs(float(seen) / (fraction * may_see) - 1) < 0.3


@pytest.mark.parametrize("params", [{"block_size": 0}, {"sample_size": -1}, {"num_projections": 0},
                                    {"num_projections": 31}, {"min_seq_len": 0}, {"seed": -1}, {"seed": 1.5}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 8)
    name = next(iter(params))
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="hyper", **params)


def test_causal_cross_attention_is_refused():
    q, k, v = qkv(1, 2, 2, 8, skv=12)
    with pytest.raises(AttnzooError):
        az.attention(q, k, v, method="hyper", causal=True)
