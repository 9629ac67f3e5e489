"""L5 NaLaFormer: the query norm sharpens the weights like softmax; zero queries give zero; a bad key power
is refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.linear import nala
from tests.helpers import F64, qkv


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-30).log()).sum(-1)


def test_nala_query_norm_sharpens_the_weights() -> None:
    """Softmax-like: the same direction with a larger norm gives a spikier (lower-entropy) distribution."""
    gen = torch.Generator().manual_seed(5)
    q, k, _ = qkv(2, 2, 2, 64, 8, 3, seed=gen)
    entropies = []
    for c in (0.2, 1.0, 5.0):
        qf, kf = nala.features(q * c, k, 3.0, 3)
        a = qf @ kf.transpose(-1, -2)
        entropies.append(_entropy(a / a.sum(-1, keepdim=True)).mean())
    assert entropies[0] > entropies[1] > entropies[2]
    # plain normalised linear attention would be norm-blind: features are non-negative, zero queries give 0
    qf, kf = nala.features(torch.zeros(1, 1, 2, 8, dtype=F64), k[:1, :1], 3.0, 3)
    assert bool((qf == 0).all()) and bool((kf >= 0).all())
    out = az.attention(torch.zeros(1, 1, 2, 8), k[:1, :1, :2].float(), k[:1, :1, :2].float(), method="nala")
    assert bool((out == 0).all())
    with pytest.raises(AttnzooError, match="key_power"):
        az.attention(q, k, k, method="nala", key_power=2)
