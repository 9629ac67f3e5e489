from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import StreamingLLMPress
from tests.kv.presses.patterns import focused, kept_positions, prompt


def test_sinks_and_recent_window_ragged() -> None:
    q, k, v = focused(12, {}, batch=2)
    cache, context = prompt(q, k, v, lengths=torch.tensor([12, 9]))
    out = StreamingLLMPress(compression_ratio=0.5).compress(cache, context)
    assert kept_positions(out, 0) == [0, 1, 2, 3, 10, 11]
    assert kept_positions(out, 1) == [0, 1, 2, 3, 8]  # 9 − floor(4.5) = 5 kept


def test_fewer_kept_than_sinks_keeps_the_first_sinks() -> None:
    cache, context = prompt(*focused(12, {}))
    assert kept_positions(StreamingLLMPress(budget=2).compress(cache, context)) == [0, 1]


def test_n_sink_zero_is_a_recent_window() -> None:
    cache, context = prompt(*focused(12, {}))
    assert kept_positions(StreamingLLMPress(budget=3, n_sink=0).compress(cache, context)) == [9, 10, 11]


def test_bad_n_sink() -> None:
    with pytest.raises(AttnzooError, match="n_sink"):
        StreamingLLMPress(n_sink=-1)
