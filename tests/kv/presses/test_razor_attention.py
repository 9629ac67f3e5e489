from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import RazorAttentionPress
from attnzoo.kv.presses.razor_attention import detect_retrieval_heads
from tests.helpers import qkv
from tests.kv.presses.patterns import SHARP, focused, kept_positions, prompt


@pytest.mark.parametrize("heads", [(1,), [False, True]])
def test_retrieval_head_keeps_all_others_sinks_recent_and_compensation(heads: object) -> None:
    q, k, v = qkv(1, 2, 2, 16, seed=0)
    cache, context = prompt(q, k, v)
    out = RazorAttentionPress(budget=7, retrieval_heads=heads).compress(cache, context)
    assert kept_positions(out, 0, 1) == list(range(16))
    assert kept_positions(out, 0, 0) == [0, 1, 2, 3, 13, 14, 15]  # 13: the compensation token (last dropped)
    comp = out.positions[0, 0].tolist().index(13)
    assert out.log_weight[0, 0, comp].item() == pytest.approx(math.log(10))  # positions 4..13 dropped
    torch.testing.assert_close(out.keys[0, 0, comp], k[0, 0, 4:14].mean(0))
    torch.testing.assert_close(out.values[0, 0, comp], v[0, 0, 4:14].mean(0))
    assert bool((out.log_weight[0, 1] == 0).all())


def test_compensation_of_identical_tokens_is_exact() -> None:
    """n identical dropped tokens merged into one slot of weight n give the attention of the n tokens."""
    q, k, v = qkv(2, 4, 2, 20, seed=1)
    k[:, :, 4:15], v[:, :, 4:15] = k[:, :, 4:5], v[:, :, 4:5]
    lengths = torch.tensor([20, 17])
    _, full = az.prefill(q, k, v, method="softmax", lengths=lengths)
    _, pressed = az.prefill(q, k, v, method="softmax", lengths=lengths,
                            press=RazorAttentionPress(compression_ratio=0.5, retrieval_heads=()))
    for t in range(3):
        step = qkv(2, 4, 2, 1, seed=10 + t)
        expected, full = az.step(full, *step)
        got, pressed = az.step(pressed, *step)
        torch.testing.assert_close(got, expected)


def test_merged_counts_carry_into_a_second_compensation() -> None:
    q, k, v = qkv(1, 2, 1, 16, seed=2)
    cache, context = prompt(q, k, v)
    once = RazorAttentionPress(budget=10, retrieval_heads=()).compress(cache, context)
    twice = RazorAttentionPress(budget=6, retrieval_heads=()).compress(once, context)
    assert twice.log_weight.exp().sum().item() == pytest.approx(16.0)  # every token still counted once


def induction_prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens a b c d e f a b c d e f; kv head 1 is an induction head (the second ``x`` reads what followed the
    first), kv head 0 attends uniformly."""
    seq, half = 12, 6
    q, k, _ = focused(seq, {}, heads=2, kv_heads=2)
    for i in range(half, seq):
        q[0, 1, i, i - half + 1] = SHARP
    tokens = torch.randn(half, seq, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = tokens.repeat(2, 1).expand(1, 2, seq, seq).clone()
    return q, k, v


def test_detects_the_induction_head() -> None:
    cache, context = prompt(*induction_prompt())
    found = detect_retrieval_heads(cache, context, induction_fraction=0.5, echo_fraction=0.0, same_token=0.99,
                                   block=5)
    assert found.tolist() == [[False, True]]
    out = RazorAttentionPress(budget=6, induction_fraction=0.5, echo_fraction=0.0).compress(cache, context)
    assert kept_positions(out, 0, 1) == list(range(12)) and len(kept_positions(out, 0, 0)) == 6


def test_no_repeat_no_retrieval_head() -> None:
    q, k, v = qkv(1, 2, 2, 12, seed=3)
    cache, context = prompt(q, k, v)
    assert not detect_retrieval_heads(cache, context, 0.5, 0.5, 0.99, 256).any()


@pytest.mark.parametrize("heads", [(2,), (-1,), [True], "0"])
def test_bad_retrieval_heads(heads: object) -> None:
    q, k, v = qkv(1, 2, 2, 12, seed=3)
    cache, context = prompt(q, k, v)
    with pytest.raises(AttnzooError, match="retrieval_heads"):
        RazorAttentionPress(budget=4, retrieval_heads=heads).compress(cache, context)


def test_bad_arguments() -> None:
    with pytest.raises(AttnzooError, match="n_sink"):
        RazorAttentionPress(n_sink=-1)
    with pytest.raises(AttnzooError, match="induction_fraction"):
        RazorAttentionPress(induction_fraction=2.0)


def test_heads_are_stored_as_a_tuple() -> None:
    press = RazorAttentionPress(retrieval_heads=[1, 0])
    assert press.retrieval_heads == (1, 0) and hash(press) == hash(RazorAttentionPress(retrieval_heads=(1, 0)))
