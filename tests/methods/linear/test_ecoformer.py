"""L7 EcoFormer: binary hash codes and their Hamming-kernel weights, default hash parameters, size
mismatches refused, and the nn layer owns the hash."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.linear import ecoformer
from tests.helpers import F64, eco_params, qkv


def test_ecoformer_codes_and_hamming_weights() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = qkv(2, 2, 2, 12, 6, 3, seed=gen)
    params = {**eco_params(gen, bits=4), "bandwidth": 2.0}
    h = ecoformer.hash_codes(q, params, 2)
    assert h.shape == (2, 2, 12, 4) and bool(((h == 1) | (h == -1)).all())
    # a key with the query's own code scores 2b + 1, the opposite code 1: keys equal to the queries attend to
    # themselves most, and scaling a vector does not change its code (the hash sees the direction only)
    torch.testing.assert_close(ecoformer.hash_codes(3.0 * q, params, 2), h)
    qf, kf = ecoformer.features(q, q, params)
    a = qf @ kf.transpose(-1, -2)
    assert bool((a.diagonal(dim1=-2, dim2=-1) == 9).all()) and float(a.min()) >= 1
    # defaults draw the hash from the seed; mismatched sizes are refused naming the argument
    out = az.attention(q.float(), k.float(), v.float(), method="ecoformer", causal=True, bits=8, num_anchors=5)
    assert bool(torch.isfinite(out).all())
    with pytest.raises(AttnzooError, match="hash_weight"):
        az.attention(q, k, v, method="ecoformer", anchors=params["anchors"], hash_weight=torch.randn(2, 4, 3))
    with pytest.raises(AttnzooError, match="anchors"):
        az.attention(q, k, v, method="ecoformer", anchors=torch.randn(3, 7, 6, dtype=F64))


def test_ecoformer_layer_owns_the_hash() -> None:
    layer = az.nn.Attention(32, 4, kv_heads=2, method="ecoformer", causal=True, bits=8, num_anchors=6)
    assert set(ecoformer.NAMES) <= set(layer.learnable.keys())
    assert tuple(layer.learnable["hash_weight"].shape) == (2, 8, 6)
    assert tuple(layer.learnable["anchors"].shape) == (2, 6, 8)
    x = torch.randn(2, 9, 32)
    layer(x).square().sum().backward()
    assert float(layer.learnable["hash_weight"].grad.abs().sum()) > 0
