"""Low-precision building blocks: the int8 product is exact in int32 (GQA stacking included), grouped symmetric
quantisation stays within half a step, and the float-format roundings keep the bits they should."""

from __future__ import annotations

import torch

from attnzoo.kernels.lowp import (
    grouped_int_scores,
    int8_matmul,
    quantize_symmetric,
    round_half_away,
    to_fp8_e4m3,
    to_fp16,
    truncate_fp22,
)


def _codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_int8_matmul_is_the_exact_integer_product_for_any_shape() -> None:
    for m, k, n in ((1, 1, 1), (3, 5, 7), (33, 16, 129), (8, 4000, 9)):
        a, b = _codes(m, k), _codes(k, n, seed=1)
        got = int8_matmul(a, b)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), a.long() @ b.long())
    extreme = torch.full((2, 4000), -127, dtype=torch.int8)
    assert int8_matmul(extreme, extreme.t()).unique().tolist() == [127 * 127 * 4000]


def test_int8_matmul_with_size_one_axes_and_odd_strides() -> None:
    column = _codes(22, 1)
    row = column.t()  # (1, 22) with strides (1, 1): "contiguous", yet not row-major
    for a, b in ((_codes(42, 1), row), (row.t().t(), _codes(22, 3)), (_codes(5, 8), _codes(3, 8).t())):
        assert torch.equal(int8_matmul(a, b).long(), a.long() @ b.long())


def test_grouped_int_scores_stack_the_query_heads_of_each_key_head() -> None:
    for d in (8, 1):
        q, k = _codes(2, 6, 5, d), _codes(2, 3, 7, d, seed=1)
        got = grouped_int_scores(q, k)
        want = q.long() @ k.long().repeat_interleave(2, dim=1).transpose(-1, -2)
        assert got.shape == (2, 6, 5, 7) and torch.equal(got.long(), want)


def test_round_half_away_from_zero() -> None:
    x = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 0.49, -0.49])
    assert round_half_away(x).tolist() == [1.0, -1.0, 2.0, 3.0, -3.0, 0.0, -0.0]


def test_quantize_symmetric_by_groups_stays_within_half_a_step() -> None:
    x = torch.randn(2, 3, 10, 4, generator=torch.Generator().manual_seed(0))
    x[:, :, 9] = 0.0
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2, 3])  # token 9 alone, all zeros
    codes, scale = quantize_symmetric(x, groups, 4, 127)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert torch.equal(codes[:, :, 9], torch.zeros_like(codes[:, :, 9]))
    for g in range(3):
        tokens = groups == g
        assert torch.allclose(scale[:, :, tokens], x[:, :, tokens].abs().amax(dim=(-2, -1), keepdim=True)[..., 0]
                              / 127)
    assert bool(((codes.float() * scale.unsqueeze(-1) - x).abs() <= scale.unsqueeze(-1) / 2 + 1e-7).all())
    assert quantize_symmetric(x, groups, 4, 7)[0].abs().max() == 7


def test_float_formats_keep_their_bits() -> None:
    assert to_fp16(torch.tensor([1 + 2**-11, 1 + 2**-10, 70000.0])).tolist() == [1.0, 1 + 2**-10, float("inf")]
    assert to_fp8_e4m3(torch.tensor([1.0625, 1.125, 500.0, -3.3])).tolist() == [1.0, 1.125, 448.0, -3.25]
    assert truncate_fp22(torch.tensor([1 + 2**-13, 1 + 2**-14, -(1 + 2**-14 + 2**-13)])).tolist() == [
        1 + 2**-13, 1.0, -(1 + 2**-13)]
