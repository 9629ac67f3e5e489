"""Sigmoid attention's layer around its kernel (S2, :mod:`attnzoo.methods.softmax.sigmoid`).

Paper: "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., arXiv:2409.04431), read
with the authors' public code (apple/ml-sigmoid-attention, ``attention_simulator``: ``FlashSigmoidAttention`` and the
language-modelling configs). The paper's finding is that sigmoid attention trains like softmax attention only once
the large attention norms of early training are stabilised; its recommended parts are:

- the bias ``b = −log n``: the kernel's own default (``sigmoid_bias=None`` means ``−log(seq_kv)`` of the call, which
  for a causal model trained at length ``n`` is the paper's ``−log n``; the public LM config fixes ``−7.62 = −log
  2048`` for its training length). The layer leaves it to the kernel: pass ``sigmoid_bias=-math.log(n)`` to the layer
  (or to :func:`attnzoo.prefill`) to fix it for decoding or for inputs of other lengths;
- QK-norm: ``q ← LayerNorm(q)``, ``k ← LayerNorm(k)`` over each head's ``head_dim`` (one affine LayerNorm for all
  query heads and one for all key heads, ``eps = 1e-6``), as the public code's ``qk_norm=True`` that its LM recipes
  use;
- hybrid-norm: a LayerNorm (``eps = 1e-6``) over the model width on the sublayer's output, after the output
  projection, so a pre-norm block computes ``x + LN(attn(LN(x)))`` — the normalisation the paper pairs with
  ``b = −log n`` for language modelling.

Choices: both norms on by default and not switchable here (the paper's LayerScale alternative for vision belongs to
the block's residual branch, which attnzoo does not own); LayerNorm rather than RMSNorm, as the public code.
Nothing is computed per call, so decoding with the layer's heads equals the parallel form exactly as for the bare
kernel (with a fixed ``sigmoid_bias``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.nn.layers.base import LayerParts, register_layer
from attnzoo.registry import LayerInfo

NORM_EPS = 1e-6


class SigmoidParts(LayerParts):
    """Sigmoid attention's QK-norm and hybrid-norm output LayerNorm (the bias ``−log n`` is the kernel's default)."""

    def __init__(self, info: LayerInfo, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(info.head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(info.head_dim, eps=eps)
        self.out_norm = nn.LayerNorm(info.dim, eps=eps)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        return self.q_norm(q), self.k_norm(k), v, {}

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_norm(y)


register_layer("sigmoid", SigmoidParts)
