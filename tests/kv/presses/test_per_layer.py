"""PerLayerPress: each layer's press (or ratio), read from PressContext.layer."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import AdaKVPress, PerLayerPress
from tests.kv.presses.wrap_helpers import KeyNormScorer, prompt

LENGTHS = torch.tensor([40, 23])


def counts(press: PerLayerPress, layer: int) -> list[list[int]]:
    q, k, v = prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press, layer=layer)
    return state.data.token_counts().tolist()


def test_ratios_by_layer() -> None:
    press = PerLayerPress.from_ratios(KeyNormScorer(), [0.0, 0.5, 0.75])
    assert counts(press, 0) == [[40, 40], [23, 23]]
    assert counts(press, 1) == [[20, 20], [12, 12]]
    assert counts(press, 2) == [[10, 10], [6, 6]]
    assert counts(press, 7) == [[40, 40], [23, 23]]  # no press for layer 7: unchanged


def test_presses_by_layer_with_a_default_and_a_wrapped_press() -> None:
    press = PerLayerPress({3: KeyNormScorer(budget=5)}, default=KeyNormScorer(compression_ratio=0.5))
    assert counts(press, 3) == [[5, 5], [5, 5]]
    assert counts(press, 0) == [[20, 20], [12, 12]]
    ada = PerLayerPress.from_ratios(AdaKVPress(KeyNormScorer()), {1: 0.5})
    assert [sum(row) for row in counts(ada, 1)] == [40, 24]


def test_bad_inputs_name_the_argument() -> None:
    q, k, v = prompt()
    with pytest.raises(AttnzooError, match="layer"):
        az.prefill(q, k, v, method="softmax", press=PerLayerPress([KeyNormScorer()]))
    with pytest.raises(AttnzooError, match="presses"):
        PerLayerPress({-1: KeyNormScorer()})
    with pytest.raises(AttnzooError, match="presses"):
        PerLayerPress([0.5])  # type: ignore[list-item]
    with pytest.raises(AttnzooError, match="ratios"):
        PerLayerPress.from_ratios(KeyNormScorer(), [0.5, 1.5])
    with pytest.raises(AttnzooError, match="default"):
        PerLayerPress([], default=0.5)  # type: ignore[arg-type]
