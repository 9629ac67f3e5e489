"""``az.nn.SingleHeadAttention`` (SHViT's SHSA, H5): one head on the first channels, the rest passed through; the
formula written out; masks, gradients, determinism and argument errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn import SingleHeadAttention


def test_default_partial_dim_follows_the_papers_ratio():
    layer = SingleHeadAttention(128)
    assert (layer.partial_dim, layer.qk_dim) == (27, 16)  # round(128 / 4.67)
    assert layer.qkv.out_features == 2 * 16 + 27 and layer.proj.in_features == 128
    assert layer(torch.randn(2, 49, 128)).shape == (2, 49, 128)


def test_the_layer_is_shsa_written_out():
    torch.manual_seed(0)
    layer = SingleHeadAttention(20, partial_dim=6, qk_dim=4)
    x = torch.randn(2, 9, 20)
    x1, x2 = x[..., :6], x[..., 6:]
    mean = x1.mean(dim=(1, 2), keepdim=True)
    var = x1.var(dim=(1, 2), unbiased=False, keepdim=True)
    normed = (x1 - mean) / torch.sqrt(var + layer.pre_norm.eps) * layer.pre_norm.weight + layer.pre_norm.bias
    qkv = normed @ layer.qkv.weight.T + layer.qkv.bias
    q, k, v = qkv[..., :4], qkv[..., 4:8], qkv[..., 8:]
    o1 = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v
    want = torch.relu(torch.cat([o1, x2], dim=-1)) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), want)


def test_a_masked_key_does_not_reach_the_attention():
    torch.manual_seed(0)
    layer = SingleHeadAttention(16, partial_dim=4, method="sigmoid")
    x = torch.randn(1, 8, 16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 5] = False
    q, k, v = (t.detach() for t in layer.qkv(layer.pre_norm(x[..., :4].transpose(1, 2)).transpose(1, 2))
               .unsqueeze(1).split([16, 16, 4], dim=-1))
    direct = az.attention(q, k, v, method="sigmoid", mask=mask)
    seen = az.attention(q[:, :, :], k[:, :, [0, 1, 2, 3, 4, 6, 7]], v[:, :, [0, 1, 2, 3, 4, 6, 7]], method="sigmoid",
                        sigmoid_bias=-torch.log(torch.tensor(8.0)).item())
    torch.testing.assert_close(direct, seen)
    assert layer(x, mask=mask).shape == (1, 8, 16)


def test_gradients_reach_every_parameter_and_calls_are_deterministic():
    torch.manual_seed(0)
    layer = SingleHeadAttention(24, partial_dim=8, qk_dim=4)
    x = torch.randn(2, 10, 24)
    out = layer(x)
    assert torch.equal(out, layer(x))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


@pytest.mark.parametrize(
    ("kw", "argument"),
    [({"dim": 1}, "dim"), ({"partial_dim": 0}, "partial_dim"), ({"partial_dim": 33}, "partial_dim"),
     ({"qk_dim": 0}, "qk_dim"), ({"method": "gated_delta"}, "method"), ({"top_k": 3}, "top_k"),
     ({"method": "sigmoid", "sigmoid_bias": "x"}, "sigmoid_bias")],
)
def test_bad_arguments_name_themselves(kw: dict[str, object], argument: str):
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        SingleHeadAttention(**{"dim": 32, **kw})  # type: ignore[arg-type]


def test_bad_inputs_name_themselves():
    with pytest.raises(AttnzooError, match="^x:"):
        SingleHeadAttention(32)(torch.randn(2, 5, 31))
