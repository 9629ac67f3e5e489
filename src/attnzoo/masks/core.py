"""The mask predicate type, causal/full predicates, their dense and row-block evaluation, and combinators.

A mask predicate (``MaskMod``) is FlexAttention's ``mask_mod``: ``mod(b, h, q_idx, kv_idx) -> bool tensor``, True where
the query may attend to the key. Written with elementwise tensor ops only, one predicate serves three uses:
- :func:`dense` evaluates it by broadcasting index tensors, giving the ``(B, H, Sq, Skv)`` boolean mask that
  references and SDPA take;
- :func:`attnzoo.kernels.flex.block_mask` makes it a cached FlexAttention ``BlockMask``;
- blockwise ``torch`` paths evaluate it on the rows of one query block (:func:`dense_rows`).

Causal masks with ``seq_q != seq_kv`` are aligned bottom-right: query ``i`` sees keys ``j <= i + seq_kv - seq_q``,
so the last query sees every key, as in decoding and FlashAttention >= 2.1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["MaskMod", "and_masks", "causal", "combine", "dense", "dense_rows", "full", "or_masks", "pairs", "rows"]


def causal(seq_q: int, seq_kv: int) -> MaskMod:
    """Bottom-right aligned causal predicate: key ``j`` visible to query ``i`` iff ``j <= i + seq_kv - seq_q``."""
    offset = seq_kv - seq_q

    def causal_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx <= q_idx + offset

    return causal_mod


def full(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Every query sees every key."""
    return kv_idx >= 0


def dense_rows(
    mod: MaskMod, batch: int, heads: int, q_start: int, q_end: int, seq_kv: int, device: torch.device | str,
) -> torch.Tensor:
    """Evaluate ``mod`` on query rows ``[q_start, q_end)``: a bool tensor broadcastable to ``(B, H, rows, Skv)``."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(q_start, q_end, device=device).view(1, 1, -1, 1)
    kv = torch.arange(seq_kv, device=device).view(1, 1, 1, -1)
    return torch.broadcast_to(mod(b, h, q, kv), (batch, heads, q_end - q_start, seq_kv))


def dense(mod: MaskMod, batch: int, heads: int, seq_q: int, seq_kv: int, device: torch.device | str) -> torch.Tensor:
    """Evaluate ``mod`` everywhere: a ``(B, H, Sq, Skv)`` bool tensor (possibly a broadcast view)."""
    return dense_rows(mod, batch, heads, 0, seq_q, seq_kv, device)


def rows(t: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """Rows ``[start, end)`` of a 4-D mask or bias broadcastable along the query axis (size-1 axes kept)."""
    if t is None or t.shape[-2] == 1:
        return t
    return t[..., start:end, :]


def pairs(t: torch.Tensor, q_index: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """A 4-D mask or bias at query rows ``q_index`` and key columns ``kv_index`` (size-1 axes kept for broadcasting)."""
    t = t if t.shape[2] == 1 else t[:, :, q_index]
    return t if t.shape[3] == 1 else t[:, :, :, kv_index]


def combine(
    causal_: bool, mask: torch.Tensor | None, seq_q: int, seq_kv: int, device: torch.device | str,
) -> torch.Tensor | None:
    """One boolean mask (broadcastable to ``(B, H, Sq, Skv)``) for a causal flag and an optional user mask."""
    if not causal_:
        return mask
    tri = dense(causal(seq_q, seq_kv), 1, 1, seq_q, seq_kv, device)
    return tri if mask is None else tri & mask
