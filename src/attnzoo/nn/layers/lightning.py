"""Lightning Attention's layer: TransNormerLLM's gated, normalised linear attention (L2,
:mod:`attnzoo.methods.linear.lightning`).

Papers: "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer" (Qin et al.,
arXiv:2307.14995), §3 (gated linear attention, SRMSNorm, the decay schedule), whose layer Lightning Attention-2
("Various Lengths, Constant Speed", arXiv:2405.17381) computes; read with the authors' public model code
(OpenNLPLab/TransnormerLLM, ``NormLinearAttention``). Re-derived here, not copied.

For ``x (B, N, dim)`` with its projected heads ``q, k, v``::

    Q = φ(x W_q),  K = φ(x W_k),  V = x W_v,  U = x W_u,  φ = SiLU (Swish)
    Q̃_s = [Q_s ⊙ cos(sθ), Q_s ⊙ sin(sθ)],  K̃_t = [K_t ⊙ cos(tθ), K_t ⊙ sin(tθ)]        (LRPE)
    O = SRMSNorm((Q̃ K̃ᵀ ⊙ M) V) ⊙ U,   SRMSNorm(o) = o / sqrt(mean(o²) + ε)  (no weight, over all heads' channels)

then the layer's output projection. ``M`` is the kernel's decay mask ``λ_h^{i−j}``.

- LRPE (linearised relative positional encoding, "Linearized Relative Positional Encoding", Qin et al.,
  arXiv:2307.09270; TransNormerLLM's "LRPE-d" is it times the decay): ``Q̃_s·K̃_t = Σ_j Q_sj K_tj cos((s−t)θ_j)``,
  a relative position term that still factorises, so the kernel stays linear; the heads' query/key dimension doubles
  (values keep theirs). ``θ_j = 10000^(−2j/D)`` for ``j < D``, fixed: the cosine form of the authors' later public
  code (OpenNLPLab's ``Lrpe``, ``lrpe_type`` 3); the paper also allows learnt angles, not taken. Positions count
  from 0 at the first token of ``x``, so the parts see whole sequences (decoding slices the parallel form's heads).

- decay: the kernel's default rates ``s_h = 2^(−8h/H)`` (the ALiBi slopes), which are TransNormerLLM's rates at its
  first layer. The paper scales them per layer, ``s_h · (1 − l/(L−1) + 1e−5)`` for layer ``l`` of ``L`` (fixed, not
  learned); a model stacking layers passes ``decay=transnormer_decay(heads, l, L)`` to each layer.
- the scale: attnzoo's kernel multiplies the scores by ``1/√D``; the paper has no scale. SRMSNorm divides the scale
  out (up to ε), so the layer's output is the paper's.
- ``U`` has no activation and no bias (the public code); SRMSNorm has ``ε = 1e-6`` and is computed in fp32.

Nothing is computed per call (the decay is fixed), so decoding with the layer's heads equals the parallel form
exactly as for the bare kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import fail
from attnzoo.methods.linear.common import alibi_rates
from attnzoo.nn.layers.base import LayerParts, channels_to_heads, heads_to_channels, register_layer
from attnzoo.registry import LayerInfo

NORM_EPS = 1e-6
LRPE_BASE = 10000.0


def transnormer_decay(heads: int, layer: int, layers: int) -> torch.Tensor:
    """TransNormerLLM's decay rates ``(heads,)`` of layer ``layer`` (0-based) of ``layers``:
    ``2^(−8h/H) · (1 − layer/(layers − 1) + 1e−5)`` (layer 0 has the plain ALiBi slopes; one layer alone too)."""
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise fail("layers", "a positive int", repr(layers))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
        raise fail("layer", f"an int in [0, {layers})", repr(layer))
    depth = 1.0 - layer / (layers - 1) + 1e-5 if layers > 1 else 1.0
    return alibi_rates(heads, torch.device("cpu"), torch.float32) * depth


def simple_rms_norm(o: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``o / sqrt(mean(o²) + ε)`` over the last dim, in fp32 (TransNormerLLM's SRMSNorm: no weight)."""
    o32 = o.float()
    return (o32 * torch.rsqrt(o32.square().mean(-1, keepdim=True) + eps)).to(o.dtype)


def lrpe_angles(head_dim: int, base: float = LRPE_BASE) -> torch.Tensor:
    """LRPE's fixed angles ``θ_j = base^(−2j/D)``, ``(head_dim,)``."""
    return base ** (-2.0 * torch.arange(head_dim, dtype=torch.float32) / head_dim)


def lrpe(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[x ⊙ cos(tθ), x ⊙ sin(tθ)]`` for positions ``t = 0…N−1``: ``(B, H, N, D) → (B, H, N, 2D)``."""
    t = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
    angle = (t[:, None] * theta.to(x.device)).to(x.dtype)
    return torch.cat([x * angle.cos(), x * angle.sin()], dim=-1)


class TransNormerParts(LayerParts):
    """TransNormerLLM's SiLU and LRPE on queries and keys, and its SRMSNorm output with the output gate
    ``U = x W_u``."""

    def __init__(self, info: LayerInfo, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.heads, self.eps = info.heads, eps
        self.gate_proj = nn.Linear(info.dim, info.heads * info.head_dim, bias=False)
        self.register_buffer("theta", lrpe_angles(info.head_dim), persistent=False)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        return lrpe(F.silu(q), self.theta), lrpe(F.silu(k), self.theta), v, {}

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        normed = simple_rms_norm(heads_to_channels(out), self.eps)
        return channels_to_heads(normed * self.gate_proj(x), self.heads)


register_layer("lightning", TransNormerParts)
