"""RALA's layer (L6, :mod:`attnzoo.methods.linear.rala`): the output rank augmentation, a gate computed from the token.

Paper: "Breaking the Low-Rank Dilemma of Linear Attention" (Fan et al., arXiv:2411.07635), read with the authors'
public code (qhfan/RALA, ``GateLinearAttentionNoSilu``). Re-derived here, not copied.

The layer projects the input to a fourth head-shaped tensor next to q, k and v and multiplies the attention output by
it element-wise (the paper's output rank augmentation)::

    O = RALA(Q, K, V) ⊙ (x W_o + b_o),   W_o (dim, H·Dv), b_o (H·Dv,)

computed here as the kernel's ``output_gate`` parameter (so ``output_gate`` cannot also be passed to the layer). No
activation on the gate (the code's "NoSilu"); ``nn.Linear``'s default initialisation.

Not built (recorded): the depthwise 5×5 convolution of V added before the gate (LePE) and the 2-D RoPE on ``φ(q)`` and
the reweighted keys need the image grid, which a sequence layer does not know.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.nn.layers.base import LayerParts, channels_to_heads, register_layer
from attnzoo.registry import LayerInfo


class RalaParts(LayerParts):
    """RALA's output gate ``x W_o + b_o``, passed to the kernel as ``output_gate``."""

    computes = ("output_gate",)

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.heads = info.heads
        self.gate_proj = nn.Linear(info.dim, info.heads * info.head_dim)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        return q, k, v, {"output_gate": channels_to_heads(self.gate_proj(x), self.heads)}


register_layer("rala", RalaParts)
