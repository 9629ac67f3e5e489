"""Gated DeltaNet's layer around the gated delta rule (L10, :mod:`attnzoo.methods.linear.gated_delta`).

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz, Hatamizadeh, arXiv:2412.06464), §3 and
its layer figure; initialisation and defaults as in fla's ``GatedDeltaNet`` layer (fla-org/flash-linear-attention,
``fla/layers/gated_deltanet.py``), which the paper's code uses. Re-derived here, not copied.

For ``x (B, N, dim)`` with its projected heads ``q, k, v``:

- short convolutions: ``q, k, v ← SiLU(causal depthwise conv₄(·))`` per channel (:class:`ShortConvolution`);
- writing strength ``β_t = σ(W_β x_t)`` per query head, in (0, 1);
- decay ``g_t = −exp(A_log) · softplus(W_α x_t + dt_bias)`` per query head (``α_t = exp(g_t) ∈ (0, 1)``), with
  ``A ~ U(0, 16)`` and ``dt ~ logU(0.001, 0.1)`` (``dt_bias = softplus⁻¹(dt)``) at initialisation, as Mamba2;
- the kernel L2-normalises q and k (the method's ``qk_l2norm=True``) and runs the gated delta rule;
- output gate and norm per head: ``o ← RMSNorm(o) · w · SiLU(W_g x)`` (:class:`GatedRMSNorm`), then the layer's
  output projection.

Choices: the value head dim equals the key head dim (fla's default expands it 2×; attnzoo's layers keep one head dim
so that methods compare at equal width); no ``allow_neg_eigval`` (β in (0, 1) as in the paper).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.nn.layers.base import ConvolvedGatedParts, register_layer
from attnzoo.registry import LayerInfo

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_HIGH = 16.0


class GatedDeltaNetParts(ConvolvedGatedParts):
    """Gated DeltaNet's short convolutions, data-dependent ``β`` and decay, and gated output norm."""

    computes = ("log_gate", "beta")

    def __init__(self, info: LayerInfo, conv_size: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__(info, conv_size, norm_eps)
        h = info.heads
        self.beta_proj = nn.Linear(info.dim, h, bias=False)
        self.decay_proj = nn.Linear(info.dim, h, bias=False)
        self.A_log = nn.Parameter(torch.empty(h).uniform_(0, A_HIGH).log())
        dt = torch.exp(torch.rand(h) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        q, k, v = self.convolve(q, k, v)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # (B, H, N)
        decay = F.softplus(self.decay_proj(x).float() + self.dt_bias)
        log_gate = (-self.A_log.float().exp() * decay).transpose(1, 2).to(x.dtype)
        return q, k, v, {"log_gate": log_gate, "beta": beta.to(x.dtype)}


register_layer("gated_delta", GatedDeltaNetParts)
