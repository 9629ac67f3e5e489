from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import H2OPress
from attnzoo.kv.presses.observe import accumulated_attention
from tests.helpers import qkv
from tests.kv.presses.patterns import focused, kept_positions, prompt

HEAVY = (0, 1, 7)


def heavy_prompt(seq: int = 12, **kw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query attends the slots of HEAVY it can see."""
    return focused(seq, {i: [t for t in HEAVY if t <= i] for i in range(seq)}, **kw)


def test_heavy_hitters_kept() -> None:
    cache, context = prompt(*heavy_prompt(heads=2))
    out = H2OPress(budget=3, recent_fraction=0.0).compress(cache, context)
    assert kept_positions(out) == [0, 1, 7]


def test_recent_share() -> None:
    cache, context = prompt(*heavy_prompt())
    out = H2OPress(budget=6, recent_fraction=0.5).compress(cache, context)
    assert kept_positions(out) == [0, 1, 7, 9, 10, 11]


def test_blockwise_accumulation_equals_the_dense_sum() -> None:
    q, k, v = qkv(2, 4, 2, 11, seed=3)
    lengths = torch.tensor([11, 6])
    cache = KVCache.from_prompt(k, v, lengths)
    total, seen_by = accumulated_attention(cache, q, 0.5, block=3)
    for b, n in enumerate(lengths.tolist()):
        kk = k[b, :, :n].repeat_interleave(2, 0)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = (q[b, :, :n] @ kk.transpose(-1, -2) * 0.5).masked_fill(~causal, -torch.inf)
        dense = s.softmax(-1).sum(1).view(2, 2, n).sum(1)  # over query rows, then over each GQA group
        torch.testing.assert_close(total[b, :, :n], dense.float())
        assert seen_by[b, 0, :n].tolist() == [2.0 * (n - j) for j in range(n)]
        assert bool((total[b, :, n:] == 0).all())


def test_decoding_keeps_the_budget_and_the_running_scores() -> None:
    q, k, v = heavy_prompt(16)
    q, k, v = q[..., :12, :], k[..., :12, :], v[..., :12, :]
    _, state = az.prefill(q, k, v, method="softmax", scale=1.0, press=H2OPress(budget=5, recent_fraction=0.4))
    assert kept_positions(state.data) == [0, 1, 7, 10, 11]
    before = state.data.slot_data["h2o"][0, 0].clone()
    for t in range(12, 15):
        qt = torch.zeros(1, 1, 1, 16, dtype=torch.float64)
        qt[..., 7] = 40.0  # every new query reads slot 7
        kt = torch.zeros(1, 1, 1, 16, dtype=torch.float64)
        kt[..., t] = 1.0
        _, state = az.step(state, qt, kt, torch.zeros(1, 1, 1, 16, dtype=torch.float64))
        assert state.data.token_counts().tolist() == [[5]]
        assert kept_positions(state.data)[-2:] == [t - 1, t]  # floor(5 · 0.4) = 2 recent tokens
    assert kept_positions(state.data)[:3] == [0, 1, 7]
    slot7 = state.data.positions[0, 0].tolist().index(7)
    assert state.data.slot_data["h2o"][0, 0, slot7] == pytest.approx(float(before[2]) + 3, abs=1e-6)


def test_decoding_by_ratio_keeps_a_share_of_the_tokens_seen() -> None:
    q, k, v = qkv(2, 2, 1, 10, seed=1)
    _, state = az.prefill(q, k, v, method="softmax", lengths=torch.tensor([10, 7]),
                          press=H2OPress(compression_ratio=0.5))
    for t in range(4):
        _, state = az.step(state, *qkv(2, 2, 1, 1, seed=20 + t))
    assert state.data.token_counts().tolist() == [[7], [6]]  # 14 − 7, 11 − 5


def test_bad_arguments() -> None:
    with pytest.raises(AttnzooError, match="recent_fraction"):
        H2OPress(recent_fraction=1.5)
    with pytest.raises(AttnzooError, match="query_block"):
        H2OPress(query_block=0)
