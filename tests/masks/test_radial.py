"""Radial attention's masks (P7) against explicit loops: the paper's token rule, the deployed block mask, and how
sparse the block mask is in frames."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnzoo.masks.radial import radial, radial_blocks
from tests.helpers import dense_mask


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
    got = dense_mask(radial(frames, spatial, text, first, "cpu"), n)
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
