"""DecodingPress: compression during decoding keeps the cache bounded over many steps."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import AdaKVPress, ComposedPress, DecodingPress
from attnzoo.kv.presses.decoding import QUERIES
from attnzoo.kv.ragged import RaggedKVCache
from tests.kv.presses.wrap_helpers import KeyNormScorer, RecentAttentionScorer, prompt, token

LENGTHS = torch.tensor([40, 23])


def run(press: DecodingPress, steps: int) -> list[torch.Tensor]:
    """Token counts per row after each of ``steps`` steps (B=2, ragged prompt lengths)."""
    q, k, v = prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    seen = []
    for i in range(steps):
        out, state = az.step(state, *token(seed=i))
        assert bool(torch.isfinite(out).all())
        seen.append(state.data.token_counts().clone())
    assert state.data.extras[QUERIES].shape == (2, 4, press.query_window, 8)
    return seen


@pytest.mark.parametrize("scorer", [KeyNormScorer(), RecentAttentionScorer()])
def test_target_size_bounds_the_cache(scorer: KeyNormScorer) -> None:
    counts = run(DecodingPress(scorer, target_size=16, interval=8, query_window=6), 60)
    assert max(int(c.max()) for c in counts) == 16 + 8 - 1  # compressed when a row reaches target + interval
    assert int(counts[-1].max()) <= 16 + 8
    fell = [i for i in range(1, 60) if bool((counts[i] < counts[i - 1]).any())]
    assert fell and all(int(counts[i].max()) == 16 for i in fell)  # back to the target exactly


def test_ratio_of_the_tokens_seen() -> None:
    counts = run(DecodingPress(KeyNormScorer(), compression_ratio=0.5, interval=4), 50)
    seen = LENGTHS + 50
    target = seen - seen // 2
    assert bool((counts[-1] <= (target + 4).view(2, 1)).all())
    assert bool((counts[-1] >= (target - 4).view(2, 1)).all())


def test_wraps_adakv_and_composes_after_a_prefill_press() -> None:
    q, k, v = prompt()
    press = ComposedPress([KeyNormScorer(compression_ratio=0.5),
                           DecodingPress(AdaKVPress(KeyNormScorer()), target_size=10, interval=6)])
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    assert state.data.token_counts().tolist() == [[20, 20], [12, 12]]
    for i in range(40):
        _, state = az.step(state, *token(seed=i))
        assert int(state.data.token_counts().sum(-1).max()) < 2 * (10 + 6)
    assert isinstance(state.data, RaggedKVCache)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(AttnzooError, match="target_size"):
        DecodingPress(KeyNormScorer())
    with pytest.raises(AttnzooError, match="target_size"):
        DecodingPress(KeyNormScorer(), target_size=4, compression_ratio=0.5)
    with pytest.raises(AttnzooError, match="target_size"):
        DecodingPress(KeyNormScorer(), target_size=0)
    with pytest.raises(AttnzooError, match="interval"):
        DecodingPress(KeyNormScorer(), target_size=4, interval=0)
    with pytest.raises(AttnzooError, match="compression_ratio"):
        DecodingPress(KeyNormScorer(), compression_ratio=1.0)
    with pytest.raises(AttnzooError, match="press"):
        DecodingPress(ComposedPress([KeyNormScorer()]), target_size=4)  # type: ignore[arg-type]
