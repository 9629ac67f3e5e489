"""Pieces the local (structured-sparsity) methods share: caches of tilings and the FlexAttention backend."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import Tiles, Tiling
from attnzoo.masks import MaskMod
from attnzoo.registry import Call

_tilings: dict[Hashable, Tiling] = {}
_MAX_TILINGS = 32


def cached_tiling(key: Hashable, device: torch.device, build: Callable[[], Tiles]) -> Tiling:
    """The tiling of the tiles ``build()`` makes for a configuration ``key``, built once per device (O(n·T·W))."""
    full_key = (key, str(device))
    tiling = _tilings.get(full_key)
    if tiling is None:
        if len(_tilings) >= _MAX_TILINGS:
            _tilings.pop(next(iter(_tilings)))
        tiling = Tiling(*(t.to(device) for t in build()))
        _tilings[full_key] = tiling
    return tiling


def flex_serves(call: Call) -> str | None:
    """Why the cached-block-mask FlexAttention backend cannot serve ``call``, or None."""
    if call.has_mask or call.has_bias:
        return "the flex backend of a local method takes no user mask or bias; use backend='torch'"
    return flex.unavailable(call)


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key: Hashable, mod: MaskMod
) -> torch.Tensor:
    """FlexAttention with the block mask of predicate ``mod`` (cached under ``key``, which must identify it)."""
    bm = flex.block_mask(key, mod, None, None, q.shape[2], k.shape[2], q.device)
    return flex.attention(q, k, v, scale=scale, block_mask=bm)
