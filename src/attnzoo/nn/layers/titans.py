"""Titans' neural-memory layer (the LMM, "memory without attention") around the linear memory (L12,
:mod:`attnzoo.methods.linear.titans`).

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §3.1 (data-dependent
η_t, θ_t, α_t) and §4.4 (architectural details). Gate initialisation is ours (the paper gives none; lucidrains'
titans-pytorch leaves the biases at zero and scales θ by a maximum learning rate). Re-derived here, not copied.

For ``x (B, N, dim)`` with its projected heads ``q, k, v``:

- short convolutions: ``q, k, v ← SiLU(causal depthwise conv₄(·))`` per channel (:class:`ShortConvolution`; §4.4:
  "SiLU(.) activation ... for computing query, key, and values" and "a 1D depthwise-separable convolution layer after
  each of the query, key, and value projections");
- per query head and token, from one linear projection of ``x``: momentum decay ``η_t = σ(·)``, learning rate
  ``θ_t = σ(·)`` and forgetting ``α_t = σ(·)`` (all in (0, 1); §3.1: "η_t is a data-dependent surprise decay (a
  function of x_t)" and likewise θ_t, α_t). Biases start at ``σ⁻¹(0.9)``, ``σ⁻¹(0.1)`` and ``σ⁻¹(0.01)``: a memory
  that keeps most of its momentum, learns at a tenth of the normalised keys' stable rate and forgets slowly;
- the kernel L2-normalises q and k (the method's ``qk_l2norm=True``; §4.4) and runs the chunked memory;
- output gate and norm per head: ``o ← RMSNorm(o) · w · SiLU(W_g x)`` (:class:`GatedRMSNorm`; §4.4: "normalization
  and gating with a linear layer before the final output projection"), then the layer's output projection.

The same parts serve ``method="titans_mlp"`` (the deep memory; its initial weights are the method's learnable
parameters, owned by the layer). Persistent tokens and the gated composition with sliding-window attention (MAG) are
:class:`attnzoo.nn.TitansMAG`; memory as a layer and as a context are :class:`attnzoo.nn.TitansMAL` and
:class:`attnzoo.nn.TitansMAC`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from attnzoo.nn.layers.base import ConvolvedGatedParts, register_layer
from attnzoo.registry import LayerInfo

GATE_STARTS = {"eta": 0.9, "theta": 0.1, "alpha": 0.01}  # σ(bias) of each gate at initialisation


def gate_projection(dim: int, heads: int, starts: list[float]) -> nn.Linear:
    """One linear map from ``dim`` channels to the logits of ``len(starts)`` gates per head, each gate's bias at
    ``σ⁻¹(start)`` so that it starts at ``start``."""
    projection = nn.Linear(dim, len(starts) * heads)
    with torch.no_grad():
        projection.bias.copy_(torch.tensor([math.log(s / (1 - s)) for s in starts]).repeat_interleave(heads))
    return projection


def token_gates(projection: nn.Linear, x: torch.Tensor, names: tuple[str, ...], heads: int) -> dict[str, torch.Tensor]:
    """The gates ``σ(projection(x))`` of ``x (B, N, dim)`` by name, each ``(B, H, N)``."""
    b, n, _ = x.shape
    gates = torch.sigmoid(projection(x)).view(b, n, len(names), heads).permute(2, 0, 3, 1)
    return dict(zip(names, gates.unbind(0), strict=True))


class TitansParts(ConvolvedGatedParts):
    """Titans' short convolutions, data-dependent momentum, learning-rate and forgetting gates, and gated output
    norm."""

    computes: tuple[str, ...] = tuple(GATE_STARTS)  # the gates, each started at σ(bias) = starts[name]
    starts: ClassVar[dict[str, float]] = GATE_STARTS

    def __init__(self, info: LayerInfo, conv_size: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__(info, conv_size, norm_eps)
        self.gate_logits = gate_projection(info.dim, info.heads, [self.starts[n] for n in self.computes])

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        q, k, v = self.convolve(q, k, v)
        return q, k, v, token_gates(self.gate_logits, x, self.computes, self.heads)


class MirasParts(TitansParts):
    """The same layer for Miras' memories (Moneta, Yaad: plain gradient descent, no momentum): learning-rate and
    forgetting gates only. Miras §5.3 builds its models on the same frame (convolutions, ℓ2-normalised q and k,
    gated output norm); its channel-wise low-rank gates and Yaad's data-dependent δ are not built (δ stays the
    method's parameter)."""

    computes = ("theta", "alpha")
    max_rate = 1.0  # θ_t = max_rate · σ(·)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        q, k, v, gates = super().forward(x, q, k, v)
        return q, k, v, {**gates, "theta": gates["theta"] * self.max_rate} if self.max_rate != 1 else gates


class MemoraParts(MirasParts):
    """Memora's layer: the learning rate reaches 16 (``θ_t = 16 σ(·)``, starting at 8; our choice). Memora steps in
    log space, where a normalised key moves a log-weight by at most ``θ |e_j|``: with θ < 1 its simplex memory barely
    leaves uniform (quick MQAR: 0.53 and 0.56 accuracy for two seeds, against 0.89 and 0.97 with this rate)."""

    max_rate = 16.0
    starts: ClassVar[dict[str, float]] = {**GATE_STARTS, "theta": 0.5}


register_layer("titans", TitansParts)
register_layer("titans_mlp", TitansParts)
register_layer("moneta", MirasParts)
register_layer("yaad", MirasParts)
register_layer("memora", MemoraParts)
