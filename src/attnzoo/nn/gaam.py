"""``attnzoo.nn.GaussianAdaptiveAttention``: multi-head Gaussian adaptive attention (GAAM; DAAM's multi-head form).

Papers: "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple Modalities"
(Ioannides, Chadha, Elkins; arXiv:2401.11143) and its density-adaptive (DAAM) module; authors' code
github.com/gioannides/Gaussian-Adaptive-Attention (``MHGAAM.py``). GAAM re-weights features by how likely each value
is under a Gaussian whose mean and variance come from the data and are adjusted by learned parameters — attention as
a learned density, without query–key products::

    μ, σ² = mean and variance of x along the axis        (data-derived, per example)
    y_i   = (x − (μ + δ_i)) / √(σ² + ε)                  δ_i: learned mean offset of Gaussian i
    g     = Σ_i π_i exp(−y_i² / (2 c_i²))                c_i: learned scaled standard deviation; π = softmax(w)
    out   = x ⊙ g / Σ_axis g                             the normalised density re-weights the features

- Multi-head (DAAM): the features are split into ``heads`` groups, each with its own ``δ, c, w`` for
  ``num_gaussians`` Gaussians (a mixture, as the authors' latest code; ``num_gaussians=1`` is the single Gaussian of
  the paper's equations). Defaults as the code: ``δ = 0``, ``c = 2``, ``w = 0`` (equal weights), ε = 1e-8.
- ``axis``: ``"features"`` (statistics over each head's channels of every token) or ``"sequence"`` (over the tokens,
  per channel). Choices: heads always split the channels (the code splits whichever axis is normalised, which with
  ``"sequence"`` would tie the heads to the sequence length); ``σ²`` is the population variance ``E[x²] − μ²`` of the
  paper's equation (the code's ``torch.var`` is the unbiased one).
- ``mask (B, N)`` bool, False = padding: padding tokens keep their input (as the code) and, along ``"sequence"``,
  take no part in the statistics or the normalising sum (the code counts them as zeros in the mean).

No query–key product: this is a layer, not a q/k/v method, so it is not in the registry.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.errors import fail
from attnzoo.nn.checks import padding_mask, positive_int, tokens

AXES = ("features", "sequence")


class GaussianAdaptiveAttention(nn.Module):
    """GAAM ``x (B, N, dim) -> (B, N, dim)``: ``heads`` channel groups, ``num_gaussians`` learned Gaussians each."""

    def __init__(self, dim: int, heads: int = 1, num_gaussians: int = 1, axis: str = "features",
                 initial_c: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim, self.heads = positive_int("dim", dim), positive_int("heads", heads)
        positive_int("num_gaussians", num_gaussians)
        if dim % heads:
            raise fail("heads", f"a divisor of dim={dim}", heads)
        if axis not in AXES:
            raise fail("axis", f"one of {list(AXES)}", repr(axis))
        if isinstance(initial_c, bool) or not isinstance(initial_c, (int, float)) or not initial_c > 0:
            raise fail("initial_c", "a positive number", repr(initial_c))
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise fail("eps", "a positive number", repr(eps))
        self.axis, self.eps = axis, float(eps)
        self.mean_offsets = nn.Parameter(torch.zeros(heads, num_gaussians))
        self.c = nn.Parameter(torch.full((heads, num_gaussians), float(initial_c)))
        self.weights = nn.Parameter(torch.zeros(heads, num_gaussians))

    def _statistics(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population variance of ``x (B, N, H, Dh)`` along the axis (valid tokens only along the sequence),
        keeping dims."""
        if self.axis == "features":
            mean = x.mean(-1, keepdim=True)
            return mean, (x.square().mean(-1, keepdim=True) - mean.square()).clamp_min(0.0)
        w = valid.to(x.dtype).view(*valid.shape, 1, 1)
        count = w.sum(1, keepdim=True).clamp_min(1.0)
        mean = (x * w).sum(1, keepdim=True) / count
        return mean, ((x.square() * w).sum(1, keepdim=True) / count - mean.square()).clamp_min(0.0)

    def density(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised mixture density ``g / Σ_axis g`` that re-weights ``x (B, N, dim)``, ``(B, N, dim)``."""
        b, n, _ = tokens("x", x, self.dim).shape
        padding_mask(mask, x)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        heads = x.view(b, n, self.heads, self.dim // self.heads)
        mean, var = self._statistics(heads, valid)
        offsets, c = (p.to(x.dtype).view(1, 1, self.heads, 1, -1) for p in (self.mean_offsets, self.c))
        y = (heads.unsqueeze(-1) - (mean.unsqueeze(-1) + offsets)) / torch.sqrt(var.unsqueeze(-1) + self.eps)
        mix = torch.softmax(self.weights.to(x.dtype), -1).view(1, 1, self.heads, 1, -1)
        g = (mix * torch.exp(-y.square() / (2 * c.square()))).sum(-1)  # (B, N, H, Dh)
        if self.axis == "sequence":
            g = g * valid.to(g.dtype).view(b, n, 1, 1)
        total = g.sum(-1 if self.axis == "features" else 1, keepdim=True).clamp_min(self.eps)
        return (g / total).reshape(b, n, self.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = x * self.density(x, mask)
        return out if mask is None else torch.where(mask.unsqueeze(-1), out, x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, num_gaussians={self.c.shape[1]}, axis={self.axis!r}"
