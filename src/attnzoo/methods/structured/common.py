"""Pieces the local (structured-sparsity) methods share: caches of tilings and the FlexAttention backend."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels import flex
from attnzoo.kernels.band import Tiles, Tiling, tiled_attention
from attnzoo.masks import MaskMod
from attnzoo.methods.common import masked_attention
from attnzoo.registry import Backend, Call


def check_layout(value: Any, call: Call, max_ndim: int | None = None) -> str | None:
    """Why ``value`` is not a valid ``layout`` (spatial shape of the query sequence) for ``call``, or None."""
    if value is None:
        return None
    most = f"1 to {max_ndim}" if max_ndim else "one or more"
    if (not isinstance(value, tuple) or not value or (max_ndim is not None and len(value) > max_ndim)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return f"a tuple of {most} positive ints (the spatial shape of the sequence)"
    if math.prod(value) != call.seq_q:
        return f"a shape whose product is the sequence length {call.seq_q}"
    return None


def per_axis_ints(name: str, value: Any, call: Call, low: int) -> tuple[int, ...] | str:
    """``value`` (an int or a tuple, one per layout axis) as a tuple of ints ``>= low``, or why it is not one."""
    layout = call.params.get("layout")
    if check_layout(layout, call) is not None:
        return ()  # the layout's own check reports it
    ndim = 1 if layout is None else len(layout)
    if isinstance(value, bool) or not isinstance(value, (int, tuple)):
        return f"an int or a tuple of {ndim} ints for {name}"
    if isinstance(value, tuple):
        if len(value) != ndim:
            return f"an int or a tuple of {ndim} ints (one per layout axis) for {name}"
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return f"ints in the {name} tuple"
    values = tuple(value) if isinstance(value, tuple) else (value,) * ndim
    if any(x < low for x in values):
        return f"values >= {low}"
    return values


_cache: dict[Hashable, Any] = {}
_MAX_CACHED = 8  # a 1-D tiling for N=65536, k=1023 holds ~0.4 GiB of masks (bool + fp32 additive)


def cached(key: Hashable, device: torch.device, build: Callable[[], Any]) -> Any:
    """``build()`` for a configuration ``key`` (tilings, block layouts), built once per device and kept (LRU of 8)."""
    full_key = (key, str(device))
    value = _cache.pop(full_key, None)  # re-inserted below: the dict's order is the recency order
    if value is None:
        if len(_cache) >= _MAX_CACHED:
            _cache.pop(next(iter(_cache)))  # the least recently used
        value = build()
    _cache[full_key] = value
    return value


def cached_tiling(key: Hashable, device: torch.device, build: Callable[[], Tiles]) -> Tiling:
    """The tiling of the tiles ``build()`` makes for a configuration ``key``, built once per device (O(n·T·W))."""
    return cached(("tiling", key), device, lambda: Tiling(*(t.to(device) for t in build())))


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


def mask_method(
    name: str,
    config: Callable[..., Hashable],
    mod: Callable[[Any], MaskMod],
    tiles: Callable[[Any], Tiles],
) -> tuple[Callable[..., torch.Tensor], list[Backend]]:
    """The reference and the ``torch``/``flex`` backends of a local method whose mask is one predicate.

    ``config(q, k, causal, **params)`` turns a call into the hashable configuration that fixes the mask; ``mod(config)``
    is its predicate, shared by the reference (a dense mask) and ``flex`` (a FlexAttention block mask, cached), and
    ``tiles(config)`` gives the query tiles and the key band each sees for ``torch``
    (:func:`attnzoo.kernels.band.tiled_attention`; the tiling is cached per configuration and device).
    """

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  mask: torch.Tensor | None, bias: torch.Tensor | None, **params: Any) -> torch.Tensor:
        b, h, sq, _ = q.shape
        seen = masks.dense(mod(config(q, k, causal, **params)), b, h, sq, k.shape[2], q.device)
        return masked_attention(q, k, v, seen, scale, mask, bias)

    def blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  mask: torch.Tensor | None, bias: torch.Tensor | None, **params: Any) -> torch.Tensor:
        key = config(q, k, causal, **params)
        tiling = cached_tiling((name, key), q.device, lambda: tiles(key))
        return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias)

    def flex_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                     mask: torch.Tensor | None, bias: torch.Tensor | None, **params: Any) -> torch.Tensor:
        key = config(q, k, causal, **params)
        return flex_attention(q, k, v, scale, (name, key), mod(key))

    return reference, [Backend("torch", blockwise), Backend("flex", flex_backend, flex_serves)]


def check_divisor(name: str) -> Callable[[Any, Call], str | None]:
    """A ``Param.check`` for a per-axis size that must divide each axis of the layout."""

    def check(value: Any, call: Call) -> str | None:
        sizes = per_axis_ints(name, value, call, 1)
        if isinstance(sizes, str):
            return sizes
        layout = call.params.get("layout") or (call.seq_q,)
        if sizes and any(n % s for n, s in zip(layout, sizes, strict=True)):
            return f"sizes dividing each axis of the layout {tuple(layout)}"
        return None

    return check


def smallest_divisor(n: int) -> int:
    """The smallest divisor of ``n`` above 1 (``n`` itself if prime; 1 for 1): a valid size for any length."""
    return next((d for d in range(2, n) if n % d == 0), n)


def layout_and_sizes(seq: int, layout: Any, size: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The layout (``(seq,)`` when None) and a per-axis size given as an int or a tuple, as tuples."""
    shape = (seq,) if layout is None else tuple(layout)
    return shape, tuple(size) if isinstance(size, tuple) else (size,) * len(shape)
