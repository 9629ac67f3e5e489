"""Grouped asymmetric quantisation: the per-group error bound, packing, real storage sizes, byte rows, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kernels.quantize import (
    Quantized,
    check_bits,
    dequantize,
    from_bytes,
    pack,
    quantize,
    row_bytes,
    to_bytes,
    unpack,
)


def data(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 5
    x[..., :8] += 40.0  # an outlying block of channels
    x[0, 0, -16:] = 0.3  # a constant group (float16 cannot hold 0.3 exactly)
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
def test_error_at_most_half_a_step_per_group(bits: int, group: int) -> None:
    x = data(3, 4, 128)
    q = quantize(x, bits, group)
    x_hat = dequantize(q, bits)
    err = (x - x_hat).abs().reshape(3, 4, 128 // group, group)
    step = q.scale.float().unsqueeze(-1)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6).all())
    codes = unpack(q.codes, bits)
    assert int(codes.max()) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_real_storage(bits: int) -> None:
    q = quantize(data(2, 3, 256), bits, 128)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 256 * bits // 8)
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == (2, 3, 2)
    row = to_bytes(q)
    assert row.dtype == torch.uint8 and row.shape[-1] == row_bytes(256, bits, 128) == 256 * bits // 8 + 8
    back = from_bytes(row, 256, bits, 128)
    for a, b in zip(back, q, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 32), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 32 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_order_low_bits_first() -> None:
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).item() == 1 | 2 << 2 | 3 << 4


def test_constant_group_exact_when_representable() -> None:
    x = torch.full((1, 32), 0.5)
    q = quantize(x, 2, 32)
    assert q.scale.item() == 0
    assert torch.equal(dequantize(q, 2), x)


def test_bad_input() -> None:
    for bits in (1, 3, 16, True):
        with pytest.raises(AttnzooError, match="^bits: expected one of"):
            check_bits(bits)
    with pytest.raises(AttnzooError, match="^bits:"):
        quantize(torch.zeros(2, 8), 3, 8)
    with pytest.raises(AttnzooError, match="^group:"):
        quantize(torch.zeros(2, 24), 2, 16)
    with pytest.raises(AttnzooError, match="^codes:"):
        pack(torch.zeros(3, dtype=torch.uint8), 2)
    with pytest.raises(AttnzooError, match="^x: expected finite values"):
        quantize(torch.tensor([[0.0, 1e6, 2.0, 3.0]]), 2, 4)
    assert isinstance(quantize(torch.zeros(1, 4), 2, 4), Quantized)
