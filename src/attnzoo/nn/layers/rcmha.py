"""RCMHA's layer around its relative-score kernel (H5, :mod:`attnzoo.methods.heads.rcmha`).

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto, Aradea,
Mubarok; arXiv:2308.03429): "the application of the Depth-Wise Convolutional Layer to the input embedding,
encompassing Query, Key, and Value", as in Primer's Multi-DConv-Head Attention ("Primer: Searching for Efficient
Transformers for Language Modeling", So et al., arXiv:2109.08668): after each of the q, k and v projections, a
depthwise convolution over the sequence, one filter per channel of every head.

Choices (Primer's, which the RCMHA paper builds on): kernel size 3 (:data:`KERNEL_SIZE`), causal (token ``t`` mixes
tokens ``t−2 … t``, zeros before the first), with a bias and no activation, PyTorch's ``Conv1d`` initialisation. The
relative positions need no part: their learnable ``content_bias``, ``position_bias`` and ``position_proj`` are the
kernel's parameters, owned by :class:`attnzoo.nn.Attention` (``position_proj`` maps the model-width sinusoid). So
``az.nn.Attention(dim, heads, method="rcmha", causal=True)`` is the RCMHA layer; nothing is computed per call, and
decoding the layer's heads equals the parallel form (the convolutions are causal).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.nn.layers.base import LayerParts, channels_to_heads, heads_to_channels, register_layer
from attnzoo.registry import LayerInfo

KERNEL_SIZE = 3


class CausalDepthwiseConv(nn.Module):
    """``(B, N, C) → (B, N, C)``: token ``t``'s channel ``c`` is ``Σ_j w_cj x_{t−size+1+j, c} + b_c`` (zeros before the
    first token), no activation (Primer's MDHA convolution)."""

    def __init__(self, channels: int, size: int = KERNEL_SIZE) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, padding=size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class RCMHAParts(LayerParts):
    """The depthwise convolutions on the projected queries, keys and values."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.q_conv = CausalDepthwiseConv(info.heads * info.head_dim)
        self.k_conv = CausalDepthwiseConv(info.kv_heads * info.head_dim)
        self.v_conv = CausalDepthwiseConv(info.kv_heads * info.head_dim)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        def conv(t: torch.Tensor, layer: CausalDepthwiseConv) -> torch.Tensor:
            return channels_to_heads(layer(heads_to_channels(t)), t.shape[1])

        return conv(q, self.q_conv), conv(k, self.k_conv), conv(v, self.v_conv), {}


register_layer("rcmha", RCMHAParts)
