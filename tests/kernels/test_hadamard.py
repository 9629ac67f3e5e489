"""The fast Walsh–Hadamard transform: orthonormal, its own inverse, Sylvester's matrix, blocks, bad sizes."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kernels.hadamard import hadamard, hadamard_blocks

F64 = torch.float64


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_matrix_is_orthonormal_sylvester(n: int) -> None:
    h = hadamard(torch.eye(n, dtype=F64))  # rows: H applied to each basis vector
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=F64))
    torch.testing.assert_close(h, sylvester(n))


def test_own_inverse_and_norm_preserving() -> None:
    x = torch.randn(3, 5, 128, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hadamard(hadamard(x)), x)
    torch.testing.assert_close(hadamard(x).norm(dim=-1), x.norm(dim=-1))


def test_spreads_an_outlier_evenly() -> None:
    x = torch.zeros(16, dtype=F64)
    x[3] = 8.0
    torch.testing.assert_close(hadamard(x).abs(), torch.full((16,), 2.0, dtype=F64))


def test_blocks_rotate_each_block() -> None:
    x = torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AttnzooError, match="^x:"):
        hadamard_blocks(x, 16)
    x = torch.randn(2, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = hadamard_blocks(x, 8)
    torch.testing.assert_close(y, torch.cat([hadamard(c) for c in x.split(8, -1)], -1))
    torch.testing.assert_close(hadamard_blocks(y, 8), x)


def test_differentiable() -> None:
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard, (x,))


@pytest.mark.parametrize("n", [0, 3, 6, 96])
def test_not_a_power_of_two_is_refused(n: int) -> None:
    with pytest.raises(AttnzooError, match="^k: expected a last dimension that is a power of two"):
        hadamard(torch.zeros(2, n), "k")
