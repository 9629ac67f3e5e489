"""ComposedPress: presses applied in order, at prefill and after each step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import ComposedPress, KnormPress, Press, PressContext, RotateKVPress
from tests.kv.presses.wrap_helpers import KeyNormScorer, decode, prompt

LENGTHS = torch.tensor([40, 23])


@dataclass(frozen=True)
class Halve(Press):
    """A press that halves every value (a stand-in for a press that shrinks each token) and records its order."""

    mark: str = "h"

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        return replace(cache, values=cache.values / 2, extras={**cache.extras, "order": _mark(cache, self.mark)})

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        return replace(cache, extras={**cache.extras, "order": _mark(cache, self.mark)})


def _mark(cache: KVCache, mark: str) -> torch.Tensor:
    before = cache.extras.get("order", torch.zeros(0))
    return torch.cat([before, torch.tensor([float(ord(mark))])])


def test_presses_run_in_order_at_prefill_and_each_step() -> None:
    q, k, v = prompt()
    press = ComposedPress([Halve("a"), KeyNormScorer(compression_ratio=0.5), Halve("b")])
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    assert state.data.extras["order"].tolist() == [ord("a"), ord("b")]
    assert state.data.token_counts().tolist() == [[20, 20], [12, 12]]
    _, alone = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=KeyNormScorer(compression_ratio=0.5))
    torch.testing.assert_close(state.data.values, alone.data.values / 4)
    _, state = decode(state, 2)
    assert state.data.extras["order"].tolist() == [ord(c) for c in "ababab"]


def test_order_matters() -> None:
    q, k, v = prompt()
    half, fifteen = KeyNormScorer(compression_ratio=0.5), KeyNormScorer(budget=15)
    _, one = az.prefill(q, k, v, method="softmax", press=ComposedPress([half, fifteen]))
    _, other = az.prefill(q, k, v, method="softmax", press=ComposedPress([fifteen, half]))
    assert one.data.token_counts().tolist() == [[15, 15], [15, 15]]  # 40 → 20 → 15
    assert other.data.token_counts().tolist() == [[8, 8], [8, 8]]  # 40 → 15 → 8


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(AttnzooError, match="presses"):
        ComposedPress([])
    with pytest.raises(AttnzooError, match="presses"):
        ComposedPress([KeyNormScorer(), "snapkv"])  # type: ignore[list-item]
    with pytest.raises(AttnzooError, match="presses"):
        ComposedPress(KeyNormScorer())  # type: ignore[arg-type]


def test_a_scorer_after_a_quantising_press_is_refused_by_name() -> None:
    q, k, v = (torch.randn(1, 4, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with pytest.raises(AttnzooError, match=r"^cache:"):
        az.prefill(q, k, v, method="softmax", press=ComposedPress([RotateKVPress(), KnormPress(compression_ratio=0.5)]))
