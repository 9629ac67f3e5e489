"""The key-driven GQA layer: each variant's allocation (KDGQA per pass, DGQA tracked in training and frozen in eval,
PGQA's noise in training only), shapes, masks, gradients, determinism, the MHA → grouped conversion by mean-pooling,
and bad arguments named."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads.key_driven_gqa import key_norm_allocation, key_norms
from attnzoo.nn.key_driven_gqa import VARIANTS, pool_kv_heads


def _layer(variant: str = "kdgqa", **kw: object) -> az.nn.KeyDrivenGQA:
    torch.manual_seed(0)
    return az.nn.KeyDrivenGQA(32, 8, 4, variant=variant, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_with_masks_and_is_deterministic_in_eval(variant: str) -> None:
    layer = _layer(variant)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[..., 6:] = False
    y = layer(x, mask=mask)
    assert y.shape == (2, 9, 32) and sum(layer.last_allocation or ()) == 8
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    layer.eval()
    torch.testing.assert_close(layer(x, mask=mask), layer(x, mask=mask), rtol=0, atol=0)
    if variant in ("pgqa", "gqa"):  # fixed groups: hidden keys change nothing (KDGQA/DGQA: their norms count)
        changed = x.clone()
        changed[:, 6:] = torch.randn(2, 3, 32)
        torch.testing.assert_close(layer(changed, mask=mask)[:, :6], layer(x, mask=mask)[:, :6])


def test_kdgqa_allocates_from_this_passes_keys() -> None:
    layer = _layer("kdgqa")
    x = torch.randn(2, 9, 32)
    layer(x)
    assert layer.last_allocation == key_norm_allocation(layer.project(x)[1], 8)


def test_dgqa_tracks_the_norms_in_training_and_freezes_them_in_eval() -> None:
    layer = _layer("dgqa", ema_beta=0.5)
    x1, x2 = torch.randn(2, 9, 32), 3 * torch.randn(2, 9, 32)
    n1, n2 = (key_norms(layer.project(x)[1]) for x in (x1, x2))
    layer(x1)
    torch.testing.assert_close(layer.key_norms, n1.float())
    layer(x2)
    torch.testing.assert_close(layer.key_norms, (0.5 * n2 + 0.5 * n1).float())
    layer.eval()
    tracked = layer.key_norms.clone()
    layer(torch.randn(2, 9, 32))
    torch.testing.assert_close(layer.key_norms, tracked, rtol=0, atol=0)
    assert "key_norms" in layer.state_dict() and bool(layer.state_dict()["tracked"])


def test_pgqa_perturbs_in_training_only() -> None:
    pgqa, gqa = _layer("pgqa", generator=torch.Generator().manual_seed(1)), _layer("gqa")
    x = torch.randn(2, 9, 32)
    assert not torch.allclose(pgqa(x), gqa(x))
    pgqa.eval()
    torch.testing.assert_close(pgqa(x), gqa(x))


def test_pool_kv_heads_means_consecutive_heads() -> None:
    w = torch.arange(4 * 2 * 3, dtype=torch.float64).view(8, 3)  # 4 heads of head_dim 2, input 3
    pooled = pool_kv_heads(w, 4, 2)
    torch.testing.assert_close(pooled, torch.cat([(w[0:2] + w[2:4]) / 2, (w[4:6] + w[6:8]) / 2]))
    torch.testing.assert_close(pool_kv_heads(w[:, 0], 4, 2), pooled[:, 0])


def test_from_mha_pools_kv_and_copies_the_rest() -> None:
    torch.manual_seed(0)
    mha = az.nn.Attention(32, 8, qkv_bias=True)
    layer = az.nn.KeyDrivenGQA.from_mha(mha, 2, variant="gqa")
    assert (layer.heads, layer.kv_heads, layer.variant) == (8, 2, "gqa")
    torch.testing.assert_close(layer.q_proj.weight, mha.q_proj.weight)
    torch.testing.assert_close(layer.out_proj.bias, mha.out_proj.bias)
    torch.testing.assert_close(layer.k_proj.weight, pool_kv_heads(mha.k_proj.weight, 8, 2))
    torch.testing.assert_close(layer.v_proj.bias, pool_kv_heads(mha.v_proj.bias, 8, 2))
    x = torch.randn(2, 5, 32)
    same = az.nn.KeyDrivenGQA.from_mha(mha, 8, variant="gqa")  # one head per group: nothing pooled
    torch.testing.assert_close(same(x), mha(x))


@pytest.mark.parametrize(
    ("make", "argument"),
    [(lambda: _layer("nope"), "variant"), (lambda: _layer(ema_beta=0.0), "ema_beta"),
     (lambda: _layer(causal=True), "causal"), (lambda: _layer(allocation=(2, 2, 2, 2)), "allocation"),
     (lambda: az.nn.KeyDrivenGQA(32, 8, 3), "kv_heads"),
     (lambda: az.nn.KeyDrivenGQA.from_mha(az.nn.Attention(32, 8, kv_heads=4), 2), "mha"),
     (lambda: az.nn.KeyDrivenGQA.from_mha(az.nn.Attention(32, 8), 3), "kv_heads")],
)
def test_bad_arguments_are_refused_naming_them(make: Callable[[], object], argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        make()
