"""P9 long/short distance attention (CrossFormer): the groups against brute force on 1-D to 3-D layouts, and size
errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv


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
    q, k, v = qkv(2, 4, 2, n, requires_grad=True)
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
