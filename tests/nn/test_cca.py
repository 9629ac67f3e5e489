"""``az.nn.CompressedConvAttention`` (H4 CCA / CCGQA): latent geometry, the functional core it runs, other methods
inside the latent, masks, causality, gradients, determinism, costs and argument errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn import Attention, CompressedConvAttention
from tests.helpers import fit_losses


def layer(**kw: object) -> CompressedConvAttention:
    torch.manual_seed(0)
    return CompressedConvAttention(**{"dim": 32, "heads": 8, "compression": 2, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("kv_compression", "kv_heads"), [(None, 4), (4, 2), (8, 1)])
def test_latent_geometry_and_output_shape(kv_compression: int | None, kv_heads: int):
    m = layer(kv_compression=kv_compression)
    assert (m.heads, m.kv_heads, m.head_dim) == (4, kv_heads, 4)  # head dim of the MHA layer kept, heads removed
    assert m.q_proj.out_features == 16 and m.k_proj.out_features == m.v_proj.out_features == 4 * kv_heads
    assert m.out_proj.in_features == 16
    assert m.conv_weight.shape == (4 + kv_heads, 4, 2) and m.mix_weight.shape == (4 + kv_heads, 4, 4, 2)
    assert m.temperature.shape == (kv_heads,)
    assert m(torch.randn(3, 11, 32)).shape == (3, 11, 32)


def test_softmax_inside_is_the_registered_core():
    m = layer(kv_compression=4)
    x = torch.randn(2, 10, 32)
    q, k, v = Attention.project(m, x)
    core = az.attention(q, k, v, method="cca", causal=True, conv_weight=m.conv_weight, conv_bias=m.conv_bias,
                        mix_weight=m.mix_weight, mix_bias=m.mix_bias, temperature=m.temperature)
    torch.testing.assert_close(m(x), m.merge_heads(core, x))


def test_rope_rotates_the_normalised_latents_by_position():
    m = layer(kv_compression=4, rope_base=500.0)
    x = torch.randn(2, 10, 32)
    plain = layer(kv_compression=4)
    q, k, v = CompressedConvAttention.project(plain, x)  # the same weights (seed 0), no rotation
    pos = torch.arange(10, dtype=torch.float64)[:, None]
    theta = 500.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)

    def rope(t: torch.Tensor) -> torch.Tensor:  # the complex-number form of RoPE, written here independently
        z = torch.complex(t[..., :2].double(), t[..., 2:].double()) * torch.polar(torch.ones(10, 2).double(),
                                                                                    pos * theta)
        return torch.cat([z.real, z.imag], -1).float()

    out = az.attention(rope(q), rope(k), v, method="softmax", causal=True)
    torch.testing.assert_close(m(x), m.merge_heads(out, x))
    assert not torch.allclose(m(x), plain(x))


def test_another_method_runs_inside_with_its_learnable_parts():
    m = layer(method="selective")
    assert set(m.learnable) == {"query_temp", "pos_beta", "value_temp"}
    assert m.learnable["query_temp"].shape == (4, 4)
    out = m(torch.randn(2, 10, 32))
    out.sum().backward()
    assert m.learnable["query_temp"].grad is not None


def test_outputs_are_causal_and_a_fully_masked_row_gives_the_output_bias():
    m = layer()
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, 6] += 1.0
    torch.testing.assert_close(m(x)[:, :6], m(y)[:, :6])
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    mask[..., 3, :] = False
    out = m(x, mask=mask)
    torch.testing.assert_close(out[0, 3], m.out_proj.bias)


def test_gradients_reach_every_parameter_and_the_layer_trains():
    m = layer(kv_compression=4)
    x = torch.randn(4, 12, 32)
    target = torch.roll(x, 1, dims=1)
    torch.nn.functional.mse_loss(m(x), target).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    losses = fit_losses(m, x, target, 30)
    assert losses[-1] < 0.8 * losses[0]


def test_the_layer_is_deterministic():
    x = torch.randn(2, 9, 32)
    assert torch.equal(layer()(x), layer()(x))


def test_costs_scale_with_compression():
    m = CompressedConvAttention(512, 8, compression=4)
    cca, mha = m.cost(16384), m.mha_cost(16384)
    assert cca.kv_bytes / mha.kv_bytes == 0.25 and cca.attention_flops / mha.attention_flops == 0.25
    ccgqa = CompressedConvAttention(512, 8, compression=2, kv_compression=8)
    assert ccgqa.cost(64).kv_bytes / ccgqa.mha_cost(64).kv_bytes == 0.125
    assert ccgqa.cost(64).attention_flops / ccgqa.mha_cost(64).attention_flops == 0.5


@pytest.mark.parametrize(
    ("kw", "argument"),
    [({"compression": 3}, "compression"), ({"compression": 0}, "compression"),
     ({"kv_compression": 1}, "kv_compression"), ({"kv_compression": 3}, "kv_compression"),
     ({"kernel_sizes": (2,)}, "kernel_sizes"), ({"kernel_sizes": (0, 2)}, "kernel_sizes"),
     ({"value_shift": "yes"}, "value_shift"), ({"method": "cca"}, "method"), ({"heads": 0}, "heads"),
     ({"dim": 30}, "head_dim"), ({"conv_weight": torch.zeros(1)}, "conv_weight"), ({"rope_base": 1.0}, "rope_base"),
     ({"rope_base": "10000"}, "rope_base"), ({"head_dim": 3, "rope_base": 100.0}, "head_dim")],
)
def test_bad_arguments_name_themselves(kw: dict[str, object], argument: str):
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        layer(**kw)


def test_bad_inputs_name_themselves():
    m = layer()
    with pytest.raises(AttnzooError, match="^context:"):
        m(torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    with pytest.raises(AttnzooError, match="^x:"):
        m(torch.randn(4, 32))
