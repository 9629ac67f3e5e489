"""Q2 BinaryAttention: both paths equal the float sign formula (the ±1 product is exact in int8), sign(0) = +1, the
relative bias table, the 8-bit P·V, straight-through gradients, a trainable layer, the distillation loss, and bad
inputs refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.precision import binary
from tests.helpers import qkv


def _sign_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, table: torch.Tensor,
                  mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(scale · (α_Q sign Q)(α_K sign K)ᵀ + B_rel + bias) V, written out with plain float ops."""
    def hat(x: torch.Tensor) -> torch.Tensor:
        return x.abs().mean(dim=(-2, -1), keepdim=True) * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    group = q.shape[1] // k.shape[1]
    k_hat, v = hat(k).repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    sq, skv = q.shape[2], k.shape[2]
    reach = (table.shape[1] - 1) // 2
    offsets = (torch.arange(skv) - torch.arange(sq).view(-1, 1)).clamp(-reach, reach) + reach
    s = scale * hat(q) @ k_hat.transpose(-1, -2) + table[:, offsets] + bias
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_both_paths_are_the_float_sign_formula(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 9, d=16, skv=140)
    g = torch.Generator().manual_seed(3)
    table = torch.randn(4, 7, generator=g, dtype=q.dtype)
    mask = torch.rand(2, 1, 9, 140, generator=g) < 0.8
    bias = torch.randn(1, 4, 9, 140, generator=g, dtype=q.dtype)
    got = az.attention(q, k, v, method="binary", backend=backend, rel_bias=table, mask=mask, bias=bias, scale=0.3)
    torch.testing.assert_close(got, _sign_formula(q, k, v, 0.3, table, mask, bias), atol=1e-12, rtol=1e-12)


def test_fast_path_equals_reference_with_8_bit_pv() -> None:
    """The logits are the reference's bit for bit, so no weight lands in another 1/255 bucket."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        q, k, v = qkv(2, 4, 1, 33, d=16, skv=20, dtype=dtype)
        table = torch.randn(4, 11, generator=torch.Generator().manual_seed(1), dtype=dtype)
        want = az.attention(q, k, v, method="binary", backend="reference", rel_bias=table, pv_bits=8)
        got = az.attention(q, k, v, method="binary", backend="torch", rel_bias=table, pv_bits=8)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert not torch.allclose(want, az.attention(q, k, v, method="binary", rel_bias=table), atol=1e-4)


def test_zero_counts_as_positive() -> None:
    q, k, v = qkv(1, 2, 2, 6, d=8)
    q[..., 0] = 0.0
    positive = q.clone()
    positive[..., 0] = 1e-300  # the same sign, and no change to α_Q (mean |q|) in fp64
    for backend in ("torch", "reference"):
        torch.testing.assert_close(az.attention(q, k, v, method="binary", backend=backend),
                                   az.attention(positive, k, v, method="binary", backend=backend))


def test_8_bit_quantisers() -> None:
    p = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    codes = binary.quantize_probs(p) * 255
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    v = torch.randn(1, 1, 40, 6, generator=torch.Generator().manual_seed(1))
    v_hat = binary.quantize_values(v)
    step = v.abs().amax(dim=-2, keepdim=True) / 127
    assert bool(((v_hat - v).abs() <= step / 2 + 1e-5).all())


def test_straight_through_gradients() -> None:
    q, k, v = qkv(1, 2, 2, 12, d=8, requires_grad=True)
    table = torch.zeros(2, 5, dtype=q.dtype, requires_grad=True)
    out = az.attention(q, k, v, method="binary", rel_bias=table, pv_bits=8)  # auto: the reference trains
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v, table):
        assert t.grad is not None and bool(t.grad.abs().sum() > 0)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], requires_grad=True)
    binary.SignSTE.apply(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_a_layer_creates_and_trains_its_relative_bias() -> None:
    layer = az.nn.Attention(dim=32, heads=4, method="binary", pv_bits=8)
    table = dict(layer.named_parameters())["learnable.rel_bias"]
    assert table.shape == (4, 2 * binary.REL_DISTANCE + 1) and 0 < table.std() < 0.05
    x = torch.randn(2, 10, 32)
    layer(x).pow(2).sum().backward()
    assert table.grad is not None and bool(table.grad.abs().sum() > 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x))


def test_distillation_loss_is_deits() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    hard = F.cross_entropy(student, teacher.argmax(dim=-1))
    torch.testing.assert_close(binary.distillation_loss(student, teacher), hard)
    torch.testing.assert_close(binary.distillation_loss(student, teacher, labels, alpha=0.25),
                               0.75 * F.cross_entropy(student, labels) + 0.25 * hard)
    assert binary.distillation_loss(teacher, teacher, kind="soft", tau=3.0).abs() < 1e-7
    assert binary.distillation_loss(student, teacher, kind="soft", tau=2.0) > 0


@pytest.mark.parametrize(("kwargs", "name"), [({"kind": "kl"}, "kind"), ({"alpha": 1.5}, "alpha"), ({"tau": 0}, "tau"),
                                              ({"teacher": torch.zeros(6, 4)}, "teacher")])
def test_distillation_loss_refuses_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"student": torch.zeros(6, 5), "teacher": torch.zeros(6, 5), **kwargs}
    with pytest.raises(AttnzooError, match=name):
        binary.distillation_loss(**args)


def test_bad_inputs_are_refused_naming_them() -> None:
    q, k, v = qkv(1, 2, 2, 6)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="binary", causal=True)
    with pytest.raises(AttnzooError, match="rel_bias"):
        az.attention(q, k, v, method="binary", rel_bias=torch.zeros(2, 4, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="pv_bits"):
        az.attention(q, k, v, method="binary", pv_bits=4)
