"""masks.mods: score modifiers (ALiBi, soft-capping, bias, mask) and their composition."""

from __future__ import annotations

import torch

from attnzoo.masks import mods


def test_score_mods_compose_in_order_on_index_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    h, sq, skv = 3, 4, 6
    score = 5 * torch.randn(1, h, sq, skv, generator=g, dtype=torch.float64)
    bias = torch.randn(1, h, sq, skv, generator=g, dtype=torch.float64)
    mask = torch.rand(1, h, sq, skv, generator=g) > 0.3
    slopes = torch.tensor(mods.alibi_slopes(h), dtype=torch.float64)
    cap = torch.tensor(2.0, dtype=torch.float64)
    b_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h_idx = torch.arange(h).view(1, h, 1, 1)
    q_idx, k_idx = torch.arange(sq).view(1, 1, sq, 1), torch.arange(skv).view(1, 1, 1, skv)
    mod = mods.compose(mods.softcap(cap), mods.alibi(slopes, skv - sq), mods.additive(bias), mods.masked(mask))
    got = mod(score, b_idx, h_idx, q_idx, k_idx)
    distance = (q_idx + skv - sq - k_idx).abs()
    want = (2.0 * torch.tanh(score / 2.0) - slopes.view(1, h, 1, 1) * distance + bias).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(got, want)
    assert mods.alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert mods.alibi_slopes(6)[:4] == mods.alibi_slopes(4)
