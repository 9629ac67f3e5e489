from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import DapQPress
from attnzoo.kv.presses.dapq import rotate
from tests.helpers import qkv
from tests.kv.presses.patterns import focused, kept_positions, prompt


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of ``x (..., S, D)`` at ``positions (S,)``, written out independently (half-split layout)."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double().view(-1, 1) * torch.cat([freq, freq])
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angle.cos() + torch.cat([-x2, x1], -1) * angle.sin()


def test_pseudo_queries_pick_the_slots() -> None:
    cache, context = prompt(*focused(12, {10: [0, 1, 7], 11: [0, 1, 7]}, heads=2))
    assert kept_positions(DapQPress(budget=3, window_size=2).compress(cache, context)) == [0, 1, 7]


def test_rotations_compose() -> None:
    q = qkv(1, 2, 1, 5, 8, seed=0)[0]
    torch.testing.assert_close(rotate(rotate(q, 3, 500.0), 4, 500.0), rotate(q, 7, 500.0))
    torch.testing.assert_close(rotate(q, 0, 500.0), q)


@pytest.mark.parametrize("lookahead", [None, 5])
def test_pseudo_queries_sit_at_the_future_positions(lookahead: int | None) -> None:
    """With RoPE, the score is the attention of each window query's content rotated for position ``p + lookahead``."""
    seq, window, base = 10, 3, 100.0
    q_pre, k_pre, v = qkv(1, 2, 1, seq, 8, seed=1)
    pos = torch.arange(seq)
    cache, context = prompt(rope(q_pre, pos, base), rope(k_pre, pos, base), v, scale=0.5)
    got = DapQPress(budget=4, window_size=window, lookahead=lookahead, rope_base=base).score(cache, context)
    shift = window if lookahead is None else lookahead
    pseudo = rope(q_pre[:, :, -window:], pos[-window:] + shift, base)
    weights = (pseudo @ cache.keys.transpose(-1, -2) * 0.5).softmax(-1)  # future positions see every key
    torch.testing.assert_close(got, weights.mean((1, 2)).unsqueeze(1).float())


def test_ragged_windows() -> None:
    q, k, v = qkv(2, 2, 1, 12, seed=2)
    cache, context = prompt(q, k, v, lengths=torch.tensor([12, 5]))
    scores = DapQPress(budget=3, window_size=8).score(cache, context)
    assert bool((scores[1, :, 5:] == 0).all()) and scores[1, 0, :5].sum().item() == pytest.approx(1.0)


def test_bad_arguments() -> None:
    with pytest.raises(AttnzooError, match="rope_base"):
        DapQPress(rope_base=1.0)
    with pytest.raises(AttnzooError, match="lookahead"):
        DapQPress(lookahead=0)
    q, k, v = qkv(1, 1, 1, 6, 7, seed=0)
    cache, context = prompt(q, k, v)
    with pytest.raises(AttnzooError, match="rope_base"):
        DapQPress(budget=2, rope_base=10000.0).score(cache, context)
