"""P7 — radial attention: a spatial window that shrinks as the temporal distance grows (video, O(n log n)).

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation" (Li et al.,
arXiv:2506.19852), the token-level mask of its Sec. 4.1.

Formula as implemented: the sequence is ``F × s`` video tokens in frame-major order (``layout = (F, h, w)``, ``s = h·w``
tokens per frame, flattened row-major inside a frame), optionally followed by ``text_tokens`` text tokens. Query token
``k`` of frame ``i`` attends with softmax to key token ``l`` of frame ``j`` iff, with ``r = ⌊log2 max(|i − j|, 1)⌋``,

    ``(2^r ≤ s  and  |k − l| + 1 ≤ s / 2^r)``  or  ``(|i − j| mod ⌈2^r / s⌉ = 0  and  k = l)``,

AND the user mask: the same and the adjacent frame are dense, and each doubling of the frame distance halves the
spatial band (energy decay); once the band would be thinner than one token only the same position is kept, in every
``⌈2^r / s⌉``-th frame. Options from the paper's models: ``dense_first_frame`` (every query also sees all of frame 0,
the attention sink its Wan/HunyuanVideo masks keep) and ``text_tokens`` (text after the video sees and is seen by
every token). ``O_i = Σ_{j visible} softmax_j(scale · q_i·k_j + bias_ij) v_j``. The predicate is
:func:`attnzoo.masks_local_extra.radial`. Choice: the paper's deployed kernels round this mask to 128×128 blocks
(and scale the band by a ``decay_factor``); this method is the exact token-level mask, so it equals dense attention
with that mask. Default layout ``None`` means ``(N − text_tokens, 1, 1)``: one token per frame, where the rule keeps
frame distances 0, 1 and the powers of two (log-sparse attention). Self-attention, non-causal; GQA supported.

Fast path ``torch`` (:mod:`attnzoo.kernels.band`): a video query tile is ``T = min(s, 64)`` consecutive positions of
one frame; its keys are, per key frame, the spatial band the rule allows around the tile (all of the frame for a dense
first frame), plus the text tokens; text queries form tiles that see every key. One batched SDPA with the tile mask per
chunk of tiles, so work is ``≈ N · Σ_j (T + 2·reach_j)`` — ``O(N · s · log F)`` for ``s ≥ F`` — instead of ``N²``,
memory O(chunk · W · d) plus the cached tile masks (``O`` of the visible pairs). Fast path ``flex``: FlexAttention with
the predicate's block mask (cached), forward only on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.band import Tiling, concat_tiles, tiled_attention
from attnzoo.masks_local_extra import radial as radial_mod
from attnzoo.masks_local_extra import radial_reach
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax
from attnzoo.methods.local.common import cached_tiling, flex_attention, flex_serves
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register

TILE = 64

Config = tuple[int, int, int, bool]  # frames, tokens per frame, text tokens, dense first frame


def _check_layout(value: Any, call: Call) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, tuple) or not 1 <= len(value) <= 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return "a tuple (frames, h, w) of positive ints (or (frames,) / (frames, tokens per frame))"
    text = call.params.get("text_tokens", 0)
    if isinstance(text, int) and math.prod(value) != call.seq_q - text:
        return f"a shape whose product is the number of video tokens {call.seq_q - text} (sequence − text_tokens)"
    return None


def _check_text(value: Any, call: Call) -> str | None:
    return f"fewer than the sequence length {call.seq_q} (at least one video token)" if value >= call.seq_q else None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    text = int(torch.randint(0, min(call.seq_q, 4), (1,), generator=generator))
    video = call.seq_q - text
    frames = video // 2 if video % 2 == 0 and video > 2 else video
    return {"layout": (frames, video // frames, 1), "text_tokens": text,
            "dense_first_frame": bool(torch.randint(0, 2, (1,), generator=generator))}


SPEC = MethodSpec(
    name="radial",
    family="local",
    mechanism="P7",
    paper="Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation",
    arxiv="2506.19852",
    summary="video attention whose spatial band halves as the frame distance doubles (O(n log n)); text/sink options",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("layout", (tuple,), None, "(frames, h, w) of the video tokens; None means one token per frame",
              check=_check_layout),
        Param("text_tokens", (int,), 0, "text tokens after the video, attending and attended densely", low=0,
              check=_check_text),
        Param("dense_first_frame", (bool,), False, "every query also sees the whole first frame (attention sink)"),
    ),
    complexity="O(N·s·log F·d) time for s ≥ F tokens per frame (≈ N·Σ_j(T+2·reach_j)), O(N·d) working memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def _config(seq: int, layout: Any, text_tokens: int, dense_first_frame: bool) -> Config:
    video = seq - text_tokens
    if layout is None:
        return video, 1, text_tokens, dense_first_frame
    return layout[0], math.prod(layout[1:]), text_tokens, dense_first_frame


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    seen = masks.dense(radial_mod(*_config(n, layout, text_tokens, dense_first_frame), q.device), b, h, n, n,
                       q.device)
    if mask is not None:
        seen = seen & mask
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    return safe_softmax(s, seen) @ repeat_kv(v, h)


def _tiling(config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frames, spatial, text, dense_first = config
    video, reach, t = frames * spatial, radial_reach(max(frames, 1), spatial).tolist(), min(spatial, TILE)
    text_keys = torch.arange(video, video + text)
    tiles = []
    for i in range(frames):
        for a in range(0, spatial, t):
            end = min(a + t, spatial)
            keys = []
            for j in range(frames):
                m = spatial if dense_first and j == 0 else reach[abs(i - j)]
                if m >= 0:
                    keys.append(j * spatial + torch.arange(max(0, a - m), min(spatial, end + m)))
            tiles.append((i * spatial + torch.arange(a, end).unsqueeze(0), torch.cat([*keys, text_keys]).unsqueeze(0)))
    everything = torch.arange(video + text).unsqueeze(0)
    tiles += [(torch.arange(a, min(a + TILE, video + text)).unsqueeze(0), everything) for a in range(video,
              video + text, TILE)]
    q_tiles, k_tiles = concat_tiles(tiles)
    mod = radial_mod(*config, "cpu")
    seen = mod(None, None, q_tiles.unsqueeze(2), k_tiles.unsqueeze(1)) & (q_tiles >= 0).unsqueeze(2)
    return q_tiles, k_tiles, seen


def blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool,
) -> torch.Tensor:
    config = _config(q.shape[2], layout, text_tokens, dense_first_frame)
    tiling: Tiling = cached_tiling(("radial", config), q.device, lambda: _tiling(config))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias)


def flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool,
) -> torch.Tensor:
    config = _config(q.shape[2], layout, text_tokens, dense_first_frame)
    return flex_attention(q, k, v, scale, ("radial", config), radial_mod(*config, q.device))


register(SPEC, reference, [Backend("torch", blockwise), Backend("flex", flex, flex_serves)])
