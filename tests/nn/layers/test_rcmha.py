"""RCMHA's layer parts: causal depthwise convolutions (kernel 3) on q, k and v of every head; with identity filters
the layer is the bare relative kernel."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.layers.rcmha import KERNEL_SIZE, CausalDepthwiseConv


def test_convolution_is_depthwise_causal_with_kernel_3():
    conv = CausalDepthwiseConv(2)
    with torch.no_grad():
        conv.conv.weight.copy_(torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 1.0]]]))
        conv.conv.bias.zero_()
    x = torch.tensor([[[1.0, 5.0], [10.0, 6.0], [100.0, 7.0]]])
    torch.testing.assert_close(conv(x), torch.tensor([[[3.0, 5.0], [32.0, 6.0], [321.0, 7.0]]]))


def test_the_layer_owns_a_filter_per_channel_and_the_positional_parameters():
    layer = az.nn.Attention(24, 4, kv_heads=2, method="rcmha", causal=True)
    assert layer.parts.q_conv.conv.weight.shape == (24, 1, KERNEL_SIZE)
    assert layer.parts.k_conv.conv.weight.shape == layer.parts.v_conv.conv.weight.shape == (12, 1, KERNEL_SIZE)
    assert layer.learnable["position_proj"].shape == (4, 6, 24)  # the model-width sinusoid, as Transformer-XL
    assert layer.learnable["content_bias"].shape == layer.learnable["position_bias"].shape == (4, 6)


def test_identity_filters_leave_the_bare_kernel():
    torch.manual_seed(0)
    layer = az.nn.Attention(24, 4, kv_heads=2, method="rcmha", causal=True)
    bare = az.nn.Attention(24, 4, kv_heads=2, method="rcmha", causal=True, faithful=False)
    bare.load_state_dict({n: t for n, t in layer.state_dict().items() if not n.startswith("parts.")})
    with torch.no_grad():
        for conv in (layer.parts.q_conv, layer.parts.k_conv, layer.parts.v_conv):
            conv.conv.weight.zero_()
            conv.conv.weight[..., -1] = 1.0
            conv.conv.bias.zero_()
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(layer(x), bare(x))
