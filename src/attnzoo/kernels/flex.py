"""A cached FlexAttention wrapper: compiled once per process, block masks cached by configuration.

``torch.compile(flex_attention)`` costs seconds the first time and for every new mask/score function, so the compiled
callable is created once and reused; inductor's own cache reuses kernels when only closed-over *tensors* change (keep
scalars in 0-d tensors, not Python floats, or every value compiles anew). Block masks cost O(N²/block²) predicate
evaluations and are kept in a least-recently-used cache (:mod:`attnzoo.kernels.cache`) under the caller's key.

Dynamo recompiles the wrapped function for every new shape, dtype or mask/score function and, past its recompile limit
(8 by default), silently falls back to *eager* FlexAttention, which materialises the full score matrix. A library
that serves many configurations in one process hits that limit quickly, so :func:`compiled` raises it to
``RECOMPILE_LIMIT``.

On CPU FlexAttention is forward-only (PyTorch has no backward there) and cannot return the log-sum-exp (PyTorch 2.13's
CPU lowering refuses it): backends built on it say so through :func:`unavailable` (or :func:`unavailable_masked` for
those that take no user mask or bias: :func:`mask_attention`, a method's mask predicate as a cached block mask).

Log-sum-exp (``return_lse=True``, GPU): requested with ``return_aux=AuxRequest(lse=True)`` (PyTorch's replacement of the
deprecated ``return_lse`` flag). The kernel accumulates in base 2 and ``flex_attention`` converts its statistics back
(``· ln 2``), so the returned ``lse`` is the natural-log log-sum-exp of the modified logits, ``(B, H, Sq)`` in fp32,
``-inf`` on rows whose every key is masked (their output is 0), and differentiable (the backward takes its gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from attnzoo.kernels.cache import LRUCache
from attnzoo.masks import MaskMod
from attnzoo.masks.mods import ScoreMod
from attnzoo.registry import Call

_compiled: Callable[..., Any] | None = None
block_masks: LRUCache[BlockMask] = LRUCache(64)
RECOMPILE_LIMIT = 256


def unavailable(call: Call) -> str | None:
    """Why the flex backend cannot serve ``call`` (or None if it can)."""
    if call.device.type == "cpu" and call.requires_grad:
        return "FlexAttention has no backward on CPU; use backend='torch' for training on CPU"
    if call.device.type == "cpu" and call.return_lse:
        return "FlexAttention cannot return the log-sum-exp on CPU; use backend='torch'"
    if call.dtype == torch.float64:
        return "FlexAttention does not take float64"
    return None


def unavailable_masked(call: Call) -> str | None:
    """Why a flex backend that takes no user mask or bias (:func:`mask_attention`) cannot serve ``call``, or None."""
    if call.has_mask or call.has_bias:
        return "this flex backend takes no user mask or bias; use backend='torch'"
    return unavailable(call)


def compiled() -> Callable[..., Any]:
    """The process-wide compiled ``flex_attention``."""
    global _compiled
    if _compiled is None:
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, RECOMPILE_LIMIT)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_mask(
    key: Hashable, mod: MaskMod, batch: int | None, heads: int | None, seq_q: int, seq_kv: int, device: torch.device,
) -> BlockMask:
    """A ``BlockMask`` for ``mod``, cached under ``key`` (which must identify the predicate) and the shapes.

    Pass ``batch=None``/``heads=None`` when the predicate does not depend on them: one mask then serves every batch
    and head.
    """
    full_key = (key, batch, heads, seq_q, seq_kv, str(device))
    return block_masks.get(full_key, lambda: create_block_mask(mod, batch, heads, seq_q, seq_kv, device=device))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compiled FlexAttention on ``(B, H, S, D)`` tensors; GQA is handled without copying K/V. With ``return_lse``,
    ``(out, lse)`` (see the module docstring; not on CPU).

    Under ``torch.no_grad()`` the inputs are detached: on CPU FlexAttention refuses inputs that require grad even when
    nothing will be differentiated (e.g. a model's evaluation pass). Closed-over tensors are the caller's to detach.
    """
    if not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
    gqa = q.shape[1] != k.shape[1]
    if not return_lse:
        return compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    out, aux = compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                          return_aux=AuxRequest(lse=True))
    return out, aux.lse


def mask_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, key: Hashable, mod: MaskMod,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention restricted to the mask predicate ``mod`` (its block mask cached under ``key``, which must identify
    the predicate; one mask serves every batch and head); with ``return_lse``, ``(out, lse)``."""
    bm = block_mask(key, mod, None, None, q.shape[2], k.shape[2], q.device)
    return attention(q, k, v, scale=scale, block_mask=bm, return_lse=return_lse)
