"""RoPE (``attnzoo.kernels.rotary``): the half-split rotation against the complex-number form, relative positions,
shifts."""

import torch

from attnzoo.kernels.rotary import rotary


def test_rotary_is_the_complex_rotation_of_each_half_pair():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 4, 9, 100])
    theta = 500.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(5, 4, dtype=torch.float64),
                                                           pos[:, None].double() * theta)
    torch.testing.assert_close(rotary(x, pos, 500.0), torch.cat([z.real, z.imag], -1))


def test_products_depend_on_relative_positions_and_shifts_compose():
    torch.manual_seed(1)
    q, k = torch.randn(2, 1, 6, 16, dtype=torch.float64)
    pos = torch.arange(6)
    scores = rotary(q, pos) @ rotary(k, pos).transpose(-1, -2)
    shifted = rotary(q, pos + 37) @ rotary(k, pos + 37).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted)
    torch.testing.assert_close(rotary(rotary(q, 3), 4), rotary(q, 7))
    torch.testing.assert_close(rotary(q, 0), q)
    assert rotary(q.float(), pos).dtype == torch.float32
