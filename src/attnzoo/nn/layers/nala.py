"""NaLaFormer's layer (L5, :mod:`attnzoo.methods.linear.nala`): the output LayerNorm and SiLU gate.

Paper: "NaLaFormer: Norm-Aware Linear Attention for Transformer Models" (Meng et al., arXiv:2506.21137), read with the
authors' public code (``NormAwareLinearAttn``). Re-derived here, not copied.

The layer projects the input to a gate next to q, k and v and, after the attention, normalises all heads' channels
together and gates them::

    O = LayerNorm_{H·Dv}(NaLA(Q, K, V)) ⊙ SiLU(x W_g + b_g)

then the output projection. LayerNorm with its affine weights and PyTorch's ``eps = 1e-5``; ``nn.Linear``'s default
initialisation of the gate. Both act per token, so the layer stays causal when the kernel is, and nothing is computed
per call: decoding with the layer's heads equals the parallel form as for the bare kernel.

Not built (recorded): the depthwise 5×5 convolution of V added before the norm (LePE) and the 2-D RoPE on the
numerator features need the image grid, which a sequence layer does not know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.nn.layers.base import LayerParts, channels_to_heads, heads_to_channels, register_layer
from attnzoo.registry import LayerInfo


class NalaParts(LayerParts):
    """NaLaFormer's LayerNorm over all heads' outputs times the SiLU gate ``x W_g + b_g``."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.heads = info.heads
        self.gate_proj = nn.Linear(info.dim, info.heads * info.head_dim)
        self.norm = nn.LayerNorm(info.heads * info.head_dim)

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gated = self.norm(heads_to_channels(out)) * F.silu(self.gate_proj(x))
        return channels_to_heads(gated, self.heads)


register_layer("nala", NalaParts)
