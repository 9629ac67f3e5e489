"""P1 — sliding-window attention: two-sided, causal, and FreeSwim's inward window.

Papers: the common local-attention pattern (e.g. "Longformer: The Long-Document Transformer", arXiv:2004.05150);
the inward variant from "FreeSwim: Revisiting Sliding-Window Attention Mechanisms for Training-Free
Ultra-High-Resolution Video Generation" (2025; arXiv id not recorded here, code at
github.com/WillWu111/FreeSwim).

Formula as implemented: query ``i`` sits at key position ``c = i + Skv − Sq`` (bottom-right alignment, so cross
lengths behave as in decoding) and attends with softmax to

- two-sided (``causal=False``): keys ``|j − c| ≤ window``;
- causal (``causal=True``): keys ``c − window ≤ j ≤ c`` (``window + 1`` keys, the query included);
- ``inward=True`` (two-sided only): the ``2·window + 1`` keys centred on ``c``, shifted inward at the sequence borders
  so that every query keeps the full receptive field it had at training scale (FreeSwim's point); with causal masking
  no shift is possible and the window is the causal one.

AND the user mask; ``s = scale · q·k + bias``; a row with no visible key gives 0. The predicate is
:func:`attnzoo.masks.windows.sliding_window`. Default ``window=256``.

Fast path ``torch`` (:func:`torch_tiled`): query tiles of 128 against their contiguous key band (``128 + span − 1``
keys) with a band mask, batched SDPA per chunk of tiles (:mod:`attnzoo.kernels.band`): O(N·w·d) time, O(chunk·w·d)
memory. Fast path ``flex`` (:func:`flex_block_mask`): FlexAttention with the predicate's cached block mask (forward only
on CPU).

Decoding (:data:`DECODER`, causal): a query sees at most ``window + 1`` keys, so the cache is a ring of
``window + 1`` slots (``KVCache.from_prompt(..., ring=window + 1)``): position ``p`` overwrites position
``p − window − 1``, memory O(window) whatever the context. :func:`decode_prefill` runs :func:`torch_tiled` causally
over the prompt; :func:`decode_step` writes the token into its slot (O(1)) and attends over the ring, each slot's
visibility being the forward's predicate on its position (:func:`attnzoo.kv.attend.masked_step`). Once the ring is
full every slot is visible, so the step is one mask-free SDPA over ``window + 1`` keys: O(window) time.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's window of keys, so each row's
log-sum-exp is returned (the tiled kernel's per-tile one; FlexAttention's on GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import band_tiles, cached_tiling, tiled_attention
from attnzoo.kv.attend import masked_step
from attnzoo.kv.cache import KVCache
from attnzoo.masks.windows import sliding_window as sliding_window_mod
from attnzoo.masks.windows import sliding_window_starts
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

TILE = 128


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"window": int(torch.randint(0, 9, (1,), generator=generator))}


def at_reach(call: Call, fraction: float) -> dict[str, Any]:
    """``window = round(fraction · seq_kv)`` (at least 1)."""
    return {"window": max(1, round(call.seq_kv * fraction))}


SPEC = MethodSpec(
    name="sliding_window",
    family="structured",
    mechanism="P1",
    paper="Longformer: The Long-Document Transformer; FreeSwim (inward sliding window)",
    arxiv="2004.05150",
    summary="each query attends to keys within distance `window` (two-sided or causal; inward-shifted at borders)",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("window", (int,), 256, "largest distance |i − j| (two-sided) or i − j (causal) a key may have", low=0),
        Param("inward", (bool,), False, "shift the two-sided window inward at the borders (FreeSwim)"),
    ),
    complexity="O(N·w·d) time, O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
    at_reach=at_reach,
)


def _tiling(sq: int, skv: int, window: int, causal: bool, inward: bool) -> tuple[torch.Tensor, ...]:
    starts, span = sliding_window_starts(sq, skv, window, causal, inward)
    q_tiles, k_tiles = band_tiles(starts, span, skv, TILE)
    seen = sliding_window_mod(sq, skv, window, causal, inward)(0, 0, q_tiles.unsqueeze(2), k_tiles.unsqueeze(1))
    return q_tiles, k_tiles, seen


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window: int, inward: bool, return_lse: bool = False,
) -> Output:
    mod = sliding_window_mod(q.shape[2], k.shape[2], window, causal, inward)
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window: int, inward: bool, return_lse: bool = False,
) -> Output:
    config = q.shape[2], k.shape[2], window, causal, inward
    tiling = cached_tiling(("sliding_window", config), q.device, lambda: _tiling(*config))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window: int, inward: bool, return_lse: bool = False,
) -> Output:
    config = q.shape[2], k.shape[2], window, causal, inward
    return flex.mask_attention(q, k, v, scale=scale, key=("sliding_window", config), mod=sliding_window_mod(*config),
                               return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int, inward: bool,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal sliding-window attention over a (right-padded) prompt and a ring of its last ``window + 1`` tokens."""
    out = torch_tiled(q, k, v, causal=True, scale=scale, mask=None, bias=None, window=window, inward=inward)
    return out, KVCache.from_prompt(k, v, lengths, ring=window + 1)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int, inward: bool,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: write it into the ring, attend over the slots in its window."""
    return masked_step(cache, q, k, v, scale, sliding_window_mod(1, 1, window, True))


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_tiled, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)],
         DECODER)
