"""Masks from position ids: a query sees the keys whose position id is not larger than its own.

Concentric position ids (CCA, arXiv:2410.15926): the ``h × w`` visual tokens of a multimodal sequence are numbered by
ring, ``ring(y, x) = min(y, x, h − 1 − y, w − 1 − x)`` (0 on the border, growing toward the centre). In a sequence of
``image_start`` text tokens, then the image in row-major order, then text again, the position ids are

- text before the image: ``0 … image_start − 1``;
- visual token ``(y, x)``: ``image_start + ring(y, x)``;
- text after the image: ``image_start + rings + t`` for its ``t``-th token, ``rings = ceil(min(h, w) / 2)``.

The concentric causal mask lets a query see exactly the keys whose position id is not larger than its own: ordinary
causal attention for text, and inside the image every token of a ring sees its whole ring and every outer ring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.masks.core import MaskMod

__all__ = ["concentric_position_ids", "concentric_rings", "position_causal"]


def concentric_rings(layout: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Ring index of each token of an ``(h, w)`` grid, row-major: ``(h·w,)`` int64, 0 on the border."""
    h, w = layout
    y = torch.arange(h, device=device).view(-1, 1)
    x = torch.arange(w, device=device).view(1, -1)
    return torch.minimum(torch.minimum(y, h - 1 - y), torch.minimum(x, w - 1 - x)).flatten()


def concentric_position_ids(
    seq: int, layout: Sequence[int] | None, image_start: int = 0, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """CCA position ids ``(seq,)`` for a sequence holding an ``(h, w)`` image from token ``image_start`` on.

    ``layout=None`` means no image (text only): ``0 … seq − 1``. Raises ``ValueError`` when the image does not fit.
    """
    if layout is None:
        return torch.arange(seq, device=device)
    h, w = layout
    after = seq - image_start - h * w
    if image_start < 0 or after < 0:
        raise ValueError(f"an image of {h}×{w} tokens from token {image_start} does not fit in {seq} tokens")
    rings = (min(h, w) + 1) // 2
    return torch.cat([
        torch.arange(image_start, device=device),
        image_start + concentric_rings(layout, device),
        image_start + rings + torch.arange(after, device=device),
    ])


def position_causal(q_pos: torch.Tensor, kv_pos: torch.Tensor) -> MaskMod:
    """Key ``j`` visible to query ``i`` iff ``kv_pos[j] <= q_pos[i]`` (causal in position ids, ties visible)."""

    def position_causal_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor,
    ) -> torch.Tensor:
        return kv_pos[kv_idx] <= q_pos[q_idx]

    return position_causal_mod
