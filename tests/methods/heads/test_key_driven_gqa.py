"""H2 key-driven GQA: the allocation follows the key norms as the paper (min-max scaled for KDGQA, proportional for
DGQA, rounded to sum to the heads), query heads are dealt out in order, the grouped path equals the reference, PGQA's
noise has each head's own statistics, and bad allocations or causal calls are refused naming the argument."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads import key_driven_gqa as kd
from tests.helpers import assert_matches_reference, qkv


def _keys_with_norms(norms: list[float], n: int = 5, d: int = 4) -> torch.Tensor:
    """Keys ``(1, G, n, d)`` whose KV head ``g`` has Frobenius norm ``norms[g]``."""
    k = torch.randn(1, len(norms), n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = k / torch.linalg.vector_norm(k, dim=(2, 3), keepdim=True)
    return k * torch.tensor(norms, dtype=torch.float64).view(1, -1, 1, 1)


def test_kdgqa_allocates_by_min_max_scaled_key_norms() -> None:
    # scaled norms (0, 0.25, 1, 0.75) of 2 → shares 0, 0.5·4, 2·4, 1.5·4 → rounded (0, 2, 8, 6) sums to 16
    assert kd.key_norm_allocation(_keys_with_norms([1.0, 1.5, 3.0, 2.5]), 16) == (0, 2, 8, 6)
    # (0, 1, 0.5) of 1.5 → (0, 5.33, 2.67) → (0, 5, 3)
    assert kd.key_norm_allocation(_keys_with_norms([2.0, 4.0, 3.0]), 8) == (0, 5, 3)


def test_norms_are_summed_over_the_batch() -> None:
    k = torch.cat([_keys_with_norms([1.0, 3.0]), _keys_with_norms([2.0, 1.0])])
    torch.testing.assert_close(kd.key_norms(k), torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_rounding_is_fixed_to_the_number_of_heads() -> None:
    # shares (4/3, 4/3, 4/3) round to (1, 1, 1): one short, given to the first smallest
    assert kd.allocate(torch.ones(3), 4, min_max=False) == (2, 1, 1)
    # shares (1.5, 1.5, 1) round half to even to (2, 2, 1): one over, taken from the first largest
    assert kd.allocate(torch.tensor([3.0, 3.0, 2.0]), 4, min_max=False) == (1, 2, 1)


def test_degenerate_norms_give_uniform_groups() -> None:
    assert kd.key_norm_allocation(_keys_with_norms([2.0, 2.0, 2.0, 2.0]), 8) == (2, 2, 2, 2)
    assert kd.allocate(torch.zeros(2), 6, min_max=False) == (3, 3)


def test_dgqa_tracks_a_moving_average() -> None:
    first, average = kd.dgqa_allocation(torch.tensor([1.0, 3.0]), None, 8, "ema")
    assert first == (2, 6) and torch.equal(average, torch.tensor([1.0, 3.0]))
    second, average = kd.dgqa_allocation(torch.tensor([3.0, 1.0]), average, 8, "ema", beta=0.5)
    assert second == (4, 4) and torch.equal(average, torch.tensor([2.0, 2.0]))
    moved, _ = kd.dgqa_allocation(torch.tensor([5.0, 2.5]), average, 6, "diff")  # |n − m| = (3, 0.5)
    assert moved == (5, 1)


def test_query_heads_are_dealt_out_in_order() -> None:
    assert kd.query_groups((3, 0, 1), torch.device("cpu")).tolist() == [0, 0, 0, 2]
    q, k, v = qkv(2, 6, 3, 6)
    out = az.attention(q, k, v, method="key_driven_gqa", allocation=(4, 0, 2))
    torch.testing.assert_close(out[:, :4], az.attention(q[:, :4], k[:, :1], v[:, :1]))
    torch.testing.assert_close(out[:, 4:], az.attention(q[:, 4:], k[:, 2:], v[:, 2:]))


@pytest.mark.parametrize("allocation", [None, (1, 5), (0, 6), (3, 3)])
def test_grouped_path_equals_the_reference(allocation: tuple[int, ...] | None) -> None:
    q, k, v = qkv(2, 6, 2, 7, skv=9, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 6, 7, 9, generator=g) < 0.8
    bias = torch.randn(1, 6, 1, 9, generator=g, dtype=q.dtype)
    assert_matches_reference("key_driven_gqa", q, k, v, mask=mask, bias=bias, backend="sdpa", allocation=allocation)


def test_pgqa_noise_has_each_heads_statistics() -> None:
    out = torch.randn(2, 4, 6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3 + 1
    noisy = kd.perturbed(out, 2, torch.Generator().manual_seed(3))
    noise = (out - noisy).reshape(2, 4, -1)
    rows = out.reshape(2, 4, -1)
    torch.testing.assert_close(noise.mean(-1), rows.mean(-1))
    torch.testing.assert_close(noise.std(-1), rows.std(-1))
    again = kd.perturbed(out, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, noisy)


@pytest.mark.parametrize("bad", [(2, 1), (4, 0, 0), (5, -1), (3, 1.0)])
def test_a_bad_allocation_is_refused_naming_it(bad: tuple) -> None:
    q, k, v = qkv(1, 4, 2, 5)
    with pytest.raises(AttnzooError, match="^allocation: expected a tuple of 2 non-negative ints"):
        az.attention(q, k, v, method="key_driven_gqa", allocation=bad)


def test_causal_calls_are_refused_naming_causal() -> None:
    q, k, v = qkv(1, 4, 2, 5)
    with pytest.raises(AttnzooError, match="^causal:"):
        az.attention(q, k, v, method="key_driven_gqa", causal=True)
