"""Q1 SageAttention: K and Q smoothing are exact in fp64, the quantisation groups follow the kernels' layouts, the
fast path is the dequantised integer product, smoothing pays on outlier channels, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels.lowp import quantize_symmetric
from attnzoo.methods.precision import sage
from tests.helpers import qkv


def _mask_and_bias(b: int, h: int, sq: int, skv: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(b, 1, sq, skv, generator=g) < 0.8
    return mask, torch.randn(1, h, sq, skv, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_key_smoothing_is_exact_for_softmax_in_fp64(causal: bool) -> None:
    q, k, v = qkv(2, 4, 2, 9, d=16, skv=13)
    k = k + torch.linspace(-20, 20, 16, dtype=k.dtype)  # channel outliers shared by every token
    mask, bias = _mask_and_bias(2, 4, 9, 13)
    smoothed = sage.smooth_keys(k)
    assert torch.allclose(smoothed.mean(dim=2), torch.zeros(2, 2, 16, dtype=k.dtype), atol=1e-12)
    want = az.attention(q, k, v, causal=causal, mask=mask, bias=bias)
    got = az.attention(q, smoothed, v, causal=causal, mask=mask, bias=bias)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_query_smoothing_adds_back_exactly_in_fp64() -> None:
    q, k, _ = qkv(1, 2, 2, 300, d=8, skv=40)
    smoothed, means = sage.smooth_queries(q)
    assert means.shape == (1, 2, 3, 8)  # blocks of 128 rows: 128, 128, 44
    torch.testing.assert_close(means[:, :, 2], q[:, :, 256:].mean(dim=2))
    rows = means.index_select(2, torch.arange(300) // sage.BLOCK_Q)
    torch.testing.assert_close(smoothed @ k.transpose(-1, -2) + rows @ k.transpose(-1, -2), q @ k.transpose(-1, -2),
                               atol=1e-12, rtol=1e-12)


def test_groups_follow_the_kernels_layouts() -> None:
    ids, count = sage.query_groups(70, "thread", torch.device("cpu"))
    assert count == 24 and ids[[0, 8, 16, 24]].unique().tolist() == [0] and ids[1] == 1 and ids[32] == 8
    ids, count = sage.key_groups(130, "thread", torch.device("cpu"))
    assert count == 12 and ids[[0, 1, 8, 9, 56, 57]].unique().tolist() == [0] and ids[2] == 1 and ids[64] == 4
    assert sage.query_groups(300, "block", torch.device("cpu"))[1] == 3
    assert sage.query_groups(300, "warp", torch.device("cpu"))[1] == 10
    assert sage.key_groups(130, "warp", torch.device("cpu"))[1] == 3


@pytest.mark.parametrize("granularity", ["block", "warp", "thread"])
def test_fast_path_is_softmax_of_the_dequantised_integer_product(granularity: str) -> None:
    q, k, v = qkv(2, 4, 2, 150, d=16, skv=70, dtype=torch.float32)
    scale = 0.25
    got = az.attention(q, k, v, method="sage", version=1, granularity=granularity, pv="fp32", scale=scale)
    kf = sage.smooth_keys(k)
    q8, qs = quantize_symmetric(q, *sage.query_groups(150, granularity, q.device), 127)
    k8, ks = quantize_symmetric(kf, *sage.key_groups(70, granularity, q.device), 127)
    q_hat, k_hat = q8.double() * qs.double().unsqueeze(-1), k8.double() * ks.double().unsqueeze(-1)
    want = az.attention(q_hat, k_hat, v.double(), scale=scale)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("pv", "floor"), [("fp32", 0.9998), ("fp16", 0.9998), ("fp8", 0.999)])
def test_low_precision_pv_stays_close_to_softmax(pv: str, floor: float) -> None:
    q, k, v = qkv(1, 4, 4, 200, d=32, dtype=torch.float32)
    want = az.attention(q * 2, k, v)
    got = az.attention(q * 2, k, v, method="sage", pv=pv)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > floor


def test_key_smoothing_pays_on_outlier_key_channels() -> None:
    q, k, v = qkv(1, 2, 2, 256, d=32, dtype=torch.float32)
    k[..., :4] += 25.0
    want = az.attention(q, k, v)
    error = {smooth: (az.attention(q, k, v, method="sage", version=1, smooth_k=smooth) - want).norm().item()
             for smooth in (True, False)}
    assert error[True] < error[False] / 3


def test_output_dtype_masked_rows_and_inference_only() -> None:
    q, k, v = qkv(1, 2, 1, 5, d=8, skv=6, dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = az.attention(q, k, v, method="sage", mask=mask)
    assert out.dtype == torch.bfloat16 and bool((out[:, :, 2] == 0).all())
    q, k, v = qkv(1, 2, 1, 5, requires_grad=True)
    az.attention(q, k, v, method="sage").sum().backward()  # auto: the reference trains
    assert q.grad is not None
    with pytest.raises(AttnzooError, match="backend"):
        az.attention(q, k, v, method="sage", backend="torch")


@pytest.mark.parametrize(("name", "value"), [("version", 3), ("granularity", "row"), ("pv", "int8"), ("qk_bits", 2),
                                             ("smooth_k", 1)])
def test_bad_settings_are_refused_naming_them(name: str, value: object) -> None:
    q, k, v = qkv(1, 2, 2, 4)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="sage", **{name: value})
