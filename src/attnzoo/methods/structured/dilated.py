"""P6 — dilated (strided) attention: keys at a fixed dilation from the query, optionally within a window.

Papers: the strided pattern of "Generating Long Sequences with Sparse Transformers" (Child et al., arXiv:1904.10509)
and dilated sliding windows of "Longformer" (arXiv:2004.05150).

Formula as implemented: query ``i`` attends with softmax to keys ``j`` with ``(i − j) mod dilation = 0`` and
``|i − j| ≤ window · dilation`` (``causal=True``: ``0 ≤ i − j ≤ window · dilation``), AND the user mask;
``window=None`` removes the distance limit (every ``dilation``-th key: O(N²/dilation)). No border shift (contrast
P2's dilated neighborhoods, which keep exactly ``kernel_size`` keys). Self-attention only. Defaults: ``dilation=2``,
``window=None`` (the Sparse Transformer's strided pattern). The predicate is :func:`attnzoo.masks.windows.dilated`.

Fast path ``torch`` (:func:`torch_tiled`): tokens of one residue class mod ``dilation`` are a plain sliding window over
the class; each class is cut into tiles of 128 class positions seeing a band of ``128 + 2·window`` class positions
(gathered keys), batched SDPA with a cached tile mask (:mod:`attnzoo.kernels.band`). ``flex`` (:func:`flex_block_mask`):
the predicate's cached block mask.

Decoding (:data:`DECODER`, causal): with a window a query looks back at most ``window · dilation`` positions, so the
cache is a ring of ``window · dilation + 1`` slots (memory O(window · dilation), whatever the context); with
``window=None`` every ``dilation``-th earlier key stays visible and the cache is a full one. :func:`decode_prefill`
runs :func:`torch_tiled` causally over the prompt; :func:`decode_step` appends the token and attends over the slots
the forward's predicate shows it (:func:`attnzoo.kv.attend.masked_step`).

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's dilated window, so each row's
log-sum-exp is returned (the tiled kernel's per-tile one; FlexAttention's on GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import cached_tiling, strided_band_tiles, tiled_attention
from attnzoo.kv.attend import masked_step
from attnzoo.kv.cache import KVCache
from attnzoo.masks.windows import dilated as dilated_mod
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

TILE = 128


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"dilation": int(torch.randint(1, 4, (1,), generator=generator)),
            "window": int(torch.randint(0, 6, (1,), generator=generator))}


def at_reach(call: Call, fraction: float) -> dict[str, Any]:
    """Dilation 2 over ``fraction · seq_kv / 2`` keys (at least 1): the same reach as a window of
    ``fraction · seq_kv``."""
    return {"dilation": 2, "window": max(1, round(call.seq_kv * fraction) // 2)}


SPEC = MethodSpec(
    name="dilated",
    family="structured",
    mechanism="P6",
    paper="Generating Long Sequences with Sparse Transformers (strided pattern); Longformer (dilated window)",
    arxiv="1904.10509",
    summary="each query attends to every dilation-th key, within window·dilation (or all of them)",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("dilation", (int,), 2, "distance between attended keys", low=1),
        Param("window", (int,), None, "keys on each side (causal: before) the query; None: no limit", low=0),
    ),
    complexity="O(N·(window or N/dilation)·d) time, O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
    at_reach=at_reach,
)


def _tiling(n: int, dilation: int, window: int | None, causal: bool) -> tuple[torch.Tensor, ...]:
    def starts(group_len: int) -> torch.Tensor:
        u = torch.arange(group_len)
        return torch.zeros_like(u) if window is None else u - window

    width = n if window is None else (window + 1 if causal else 2 * window + 1)
    q_tiles, k_tiles = strided_band_tiles(n, dilation, starts, width, TILE)
    return q_tiles, k_tiles, dilated_mod(dilation, window, causal)(0, 0, q_tiles.unsqueeze(2), k_tiles.unsqueeze(1))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dilation: int, window: int | None, return_lse: bool = False,
) -> Output:
    return mask_reference(q, k, v, dilated_mod(dilation, window, causal), scale, mask, bias, return_lse)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dilation: int, window: int | None, return_lse: bool = False,
) -> Output:
    config = q.shape[2], dilation, window, causal
    tiling = cached_tiling(("dilated", config), q.device, lambda: _tiling(*config))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dilation: int, window: int | None, return_lse: bool = False,
) -> Output:
    config = q.shape[2], dilation, window, causal
    return flex.mask_attention(q, k, v, scale=scale, key=("dilated", config), mod=dilated_mod(dilation, window, causal),
                               return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dilation: int, window: int | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal dilated attention over a (right-padded) prompt and the cache of the keys it can still see."""
    out = torch_tiled(q, k, v, causal=True, scale=scale, mask=None, bias=None, dilation=dilation, window=window)
    return out, KVCache.from_prompt(k, v, lengths, ring=None if window is None else window * dilation + 1)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dilation: int,
    window: int | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, attend over the slots at a multiple of ``dilation`` within its window."""
    return masked_step(cache, q, k, v, scale, dilated_mod(dilation, window, True))


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_tiled, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)],
         DECODER)
