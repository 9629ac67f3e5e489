"""Other packages' implementations that suite cases compare with, when those packages are installed. Each takes
attnzoo's ``(B, H, N, D)`` tensors and returns the output in the same layout (the layout conversions are counted in
its time, as a user of that package converting attnzoo-shaped tensors would pay them)."""

from __future__ import annotations

from typing import Any

import torch


def fla_chunk_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, **_: Any) -> torch.Tensor:
    """flash-linear-attention's ``naive_chunk_linear_attn`` (causal, chunks of 64; its CPU form), normalised."""
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn

    out = naive_chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), normalize=True)
    return out.transpose(1, 2)


def natten_neighborhood(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, kernel_size: int,
                        layout: tuple[int, int] | None = None, **_: Any) -> torch.Tensor:
    """NATTEN's ``na1d`` (no ``layout``) or ``na2d`` on a row-major ``layout`` (tokens-last layouts: ``(B, N, H, D)``
    and ``(B, X, Y, H, D)``)."""
    import natten

    b, h, n, d = q.shape
    if layout is None:
        out = natten.na1d(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kernel_size=kernel_size,
                          is_causal=causal)
        return out.transpose(1, 2)

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b, *layout, h, d)

    out = natten.na2d(grid(q), grid(k), grid(v), kernel_size=kernel_size)
    return out.reshape(b, n, h, d).transpose(1, 2)
