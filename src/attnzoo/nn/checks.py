"""Argument checks the standalone ``nn`` layers share (Aaren, slot attention, the poolers, GAAM): each raises the
library's :class:`~attnzoo.errors.AttnzooError` naming the argument."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.errors import fail


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int ≥ 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(name, "a positive int", repr(value))
    return value


def tokens(name: str, x: Any, dim: int) -> torch.Tensor:
    """``x`` if it is a float ``(batch, seq, dim)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise fail(name, f"a float (batch, seq, {dim}) tensor", got)
    return x


def padding_mask(mask: Any, x: torch.Tensor, name: str = "mask") -> torch.Tensor | None:
    """``mask`` if it is None or a bool ``(batch, seq)`` tensor matching ``x (batch, seq, ...)`` (False = padding)."""
    if mask is None:
        return None
    want = tuple(x.shape[:2])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != want:
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        raise fail(name, f"a bool tensor of shape (batch, seq) = {want}", got)
    return mask
