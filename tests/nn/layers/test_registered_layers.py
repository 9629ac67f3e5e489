"""What every registered paper layer (:data:`attnzoo.nn.layers.LAYERS`) must do, walked from the registry: gradients
reach every part; where the method has a causal pattern the whole layer is causal; where it decodes, decoding with
the layer's heads and computed parameters equals the parallel form; a parameter the layer computes cannot be passed.
Each layer's own file tests what only it has (its parts' shapes, formulas and ranges)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers import LAYERS
from attnzoo.registry import get
from tests.nn.layers.checks import assert_causal, assert_decodes_like_the_parallel_form, assert_every_part_trains

NAMES = sorted(LAYERS)
CAUSAL = [n for n in NAMES if "self/causal" in get(n).spec.patterns]
DECODING = [n for n in CAUSAL if get(n).decoder is not None]
COMPUTING = [n for n in NAMES if LAYERS[n].computes]
# Sigmoid attention's default bias −log n depends on the whole length: decoding takes the parallel form's as fixed.
DECODE_FIXED: dict[str, Any] = {"sigmoid": lambda n: {"sigmoid_bias": -math.log(n)}}


def _layer(method: str, **kw: Any) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method=method, causal=method in CAUSAL, **kw)


def test_the_registry_has_the_papers_layers():
    assert {"gated_delta", "lightning", "nala", "nats_hybrid", "rala", "sigmoid"} <= set(NAMES)


@pytest.mark.parametrize("method", NAMES)
def test_every_part_trains(method: str):
    assert_every_part_trains(_layer(method), 24)


@pytest.mark.parametrize("method", CAUSAL)
def test_the_layer_is_causal(method: str):
    assert_causal(_layer(method), 24)


@pytest.mark.parametrize("method", DECODING)
def test_decoding_with_the_layers_heads_equals_the_parallel_form(method: str):
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    fixed = DECODE_FIXED.get(method, lambda n: {})(x.shape[1])
    assert_decodes_like_the_parallel_form(_layer(method).double(), x, **fixed)


@pytest.mark.parametrize("method", COMPUTING)
def test_a_parameter_the_layer_computes_cannot_be_passed(method: str):
    for name in LAYERS[method].computes:
        with pytest.raises(AttnzooError, match=f"^{name}:"):
            _layer(method, **{name: torch.ones(1)})
    assert _layer(method, faithful=False).parts is None
