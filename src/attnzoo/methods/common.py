"""The dense reference helpers every method file shares.

The reference helpers are plain, readable PyTorch (repeat the KV heads, materialise every score): they are what
fast paths are checked against, so they must stay free of the tricks that fast paths use.
"""

from __future__ import annotations

import torch

from attnzoo import masks
from attnzoo.kernels.dense import safe_softmax as safe_softmax  # re-exported: the references use it
from attnzoo.masks import MaskMod


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat ``(B, Hkv, S, D)`` key/value heads so that query head ``i`` reads kv head ``i // (heads / Hkv)``."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def dense_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Every score ``scale · q·k`` as a ``(B, H, Sq, Skv)`` tensor (K heads repeated for GQA)."""
    return scale * q @ repeat_kv(k, q.shape[1]).transpose(-1, -2)


def visible(causal: bool, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The dense ``(B, H, Sq, Skv)`` visibility of each key to each query (causal bottom-right, user mask)."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    m = masks.combine(causal, mask, sq, skv, q.device)
    full = torch.ones(b, h, sq, skv, dtype=torch.bool, device=q.device)
    return full if m is None else full & m


Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""What a reference returns: ``out``, or ``(out, lse)`` when called with ``return_lse=True``."""


def softmax_rows(s: torch.Tensor, seen: torch.Tensor, v: torch.Tensor, return_lse: bool = False) -> Output:
    """``softmax(s over seen) @ v`` for scores ``s (B, H, Sq, Skv)`` and per-query-head values ``v (B, H, Skv, Dv)``;
    with ``return_lse``, also each row's log-sum-exp ``log Σ_{seen} exp(s)`` (``-inf`` for a row that sees nothing,
    with a zero gradient)."""
    out = safe_softmax(s, seen) @ v
    return (out, row_lse(s, seen)) if return_lse else out


def row_lse(s: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp ``log Σ_{seen} exp(s)`` of scores ``s (B, H, Sq, Skv)``: ``-inf`` for a row that sees
    nothing, with a zero gradient."""
    some = seen.any(dim=-1)
    hidden = s.masked_fill(~seen, float("-inf")).masked_fill(~some.unsqueeze(-1), 0.0)
    return torch.logsumexp(hidden, dim=-1).masked_fill(~some, float("-inf"))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float,
                     mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False) -> Output:
    """Dense softmax attention over the keys ``seen`` by each query AND the user ``mask``, with ``bias`` added (and
    the rows' log-sum-exp with ``return_lse``)."""
    if mask is not None:
        seen = seen & mask
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, seen, repeat_kv(v, q.shape[1]), return_lse)


def mask_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mod: MaskMod, scale: float,
                   mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False) -> Output:
    """Dense softmax attention restricted to the mask predicate ``mod`` (evaluated on every query-key pair) AND the
    user ``mask``, with ``bias`` added: the reference of every method whose mask is one predicate."""
    b, h, sq, _ = q.shape
    seen = masks.dense(mod, b, h, sq, k.shape[2], q.device)
    return masked_attention(q, k, v, seen, scale, mask, bias, return_lse)
