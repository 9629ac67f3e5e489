"""The contract of ``attnzoo.attention``: shapes, GQA, cross, masks, and one clear error per kind of bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.errors import AttnzooError


def qkv(b=2, h=4, hkv=2, sq=9, skv=9, d=8, dv=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, sq, d, generator=g, dtype=dtype), torch.randn(b, hkv, skv, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, skv, dv, generator=g, dtype=dtype))


def test_softmax_matches_sdpa_with_gqa_and_value_dim():
    q, k, v = qkv(dv=5)
    out = az.attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert out.shape == (2, 4, 9, 5)
    torch.testing.assert_close(out, want)


def test_causal_cross_is_bottom_right_aligned():
    q, k, v = qkv(sq=3, skv=7, dtype=torch.float64)
    out = az.attention(q, k, v, causal=True)
    for i in range(3):  # query i sees keys 0 .. i + 4
        row = az.attention(q[:, :, i : i + 1], k[:, :, : i + 5], v[:, :, : i + 5])
        torch.testing.assert_close(out[:, :, i : i + 1], row)


def test_mask_and_bias_broadcast():
    q, k, v = qkv(dtype=torch.float64)
    mask = torch.rand(9, 9) < 0.5
    mask[:, 0] = True
    bias = torch.randn(1, 4, 1, 9, dtype=torch.float64)
    out = az.attention(q, k, v, mask=mask, bias=bias)
    ref = az.attention(q, k, v, mask=mask, bias=bias, backend="reference")
    torch.testing.assert_close(out, ref)


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = qkv()
    q.requires_grad_(True)
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[3] = False
    out = az.attention(q, k, v, mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda q, k, v: (q[0], k, v), "q"),
        (lambda q, k, v: (q, k[:1], v), "k"),
        (lambda q, k, v: (q, k, v[:1]), "v"),
        (lambda q, k, v: (q, k[..., :4], v), "k"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "v"),
        (lambda q, k, v: (q, torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)), "k"),
        (lambda q, k, v: (q, k.double(), v), "k"),
        (lambda q, k, v: (q, k, v.to(torch.int64)), "v"),
        (lambda q, k, v: (q, k.to("meta"), v), "k"),
        (lambda q, k, v: (q, k, "v"), "v"),
        (lambda q, k, v: (q[:, :, :0], k, v), "q"),
    ],
)
def test_bad_tensors_name_the_argument(change, argument):
    q, k, v = change(*qkv())
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        az.attention(q, k, v)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"method": "sigmod"}, "method"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"causal": 1}, "causal"),
        ({"mask": torch.ones(9, 9)}, "mask"),
        ({"mask": torch.ones(3, 9, 9, dtype=torch.bool)}, "mask"),
        ({"bias": torch.ones(9, 9, dtype=torch.float64)}, "bias"),
        ({"bias": torch.ones(9, 8)}, "bias"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"backend": "torch"}, "backend"),
        ({"method": "sigmoid", "sigmoid_bias": "x"}, "sigmoid_bias"),
        ({"method": "sigmoid", "sigmoid_bais": -1.0}, "sigmoid_bais"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(AttnzooError, match=rf"^{argument}:") as info:
        az.attention(*qkv(), **kwargs)
    assert isinstance(info.value, ValueError)


def test_unknown_method_suggests_close_names():
    with pytest.raises(AttnzooError, match="did you mean 'sigmoid'"):
        az.attention(*qkv(), method="sigmod")


def test_misspelt_parameter_suggests_the_right_one():
    with pytest.raises(AttnzooError, match="did you mean 'sigmoid_bias'"):
        az.attention(*qkv(), method="sigmoid", sigmoid_bais=-1.0)


def test_explicit_reference_backend():
    q, k, v = qkv(dtype=torch.float64)
    torch.testing.assert_close(az.attention(q, k, v, backend="reference"), az.attention(q, k, v, backend="sdpa"))


def test_auto_prefers_torch_over_flex_on_cpu():
    from attnzoo.api import prepare, select_backend

    for m in az.get("score_mod"), az.get("sliding_window"):
        q, k, v = qkv()
        call = prepare(m, q, k, v, False, None, None, None, {})[0]
        assert select_backend(m, call, "auto").name == "torch"
