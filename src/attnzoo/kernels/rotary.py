"""Rotary position embeddings (RoPE): "RoFormer: Enhanced Transformer with Rotary Position Embedding" (Su et al.,
arXiv:2104.09864), in the half-split layout of Llama and GPT-NeoX.

A vector ``x`` of even width ``D`` at position ``p`` becomes ``x · cos(pθ) + rot(x) · sin(pθ)`` with ``rot(x) =
[−x₂, x₁]`` for ``x = [x₁, x₂]`` split in halves and ``θ_i = base^(−2i/D)`` repeated over both halves. Rotating q
at ``p`` and k at ``p'`` makes their product a function of ``p − p'`` only. The angles are computed in float64 and
the result is in ``x``'s dtype.
"""

from __future__ import annotations

import torch


def rotary(x: torch.Tensor, positions: torch.Tensor | int, base: float = 10000.0) -> torch.Tensor:
    """``x (..., N, D)`` (``D`` even) rotated to ``positions``: a ``(N,)`` tensor, one position per token, or an int
    by which every token is rotated (a shift)."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    pos = torch.as_tensor(positions, device=x.device, dtype=torch.float64).reshape(-1, 1)
    angle = pos * torch.cat([freq, freq])  # (N or 1, D)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    half = d // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
