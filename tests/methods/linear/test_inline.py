"""L4 InLine attention: the weights sum to one (a constant value comes back unchanged)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from tests.helpers import F64, qkv


@pytest.mark.parametrize("causal", [True, False])
def test_inline_weights_sum_to_one(causal: bool) -> None:
    q, k, _ = qkv(2, 4, 2, 30, 6, 5, seed=9)
    out = az.attention(q, k, torch.full((2, 2, 30, 3), 2.5, dtype=F64), method="inline", causal=causal)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
