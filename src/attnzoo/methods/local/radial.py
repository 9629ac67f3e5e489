"""P7 — radial attention: a spatial window that shrinks as the temporal distance grows (video, O(n log n)).

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation" (Li et al.,
arXiv:2506.19852).

Formula as implemented: the sequence is ``F × s`` video tokens in frame-major order (``layout = (F, h, w)``, ``s = h·w``
tokens per frame, row-major inside a frame), optionally followed by ``text_tokens`` text tokens that see and are seen
by every token. ``O_i = Σ_{j visible} softmax_j(scale · q_i·k_j + bias_ij) v_j`` where "visible" is the radial mask AND
the user mask. Two masks (predicates in :mod:`attnzoo.masks_radial`, where they are spelt out):

- ``block_size=None``: the paper's token rule (Sec. 4.1). With ``d = |i − j|`` the frame distance and
  ``r = ⌊log2 max(d, 1)⌋``, token ``k`` of frame ``i`` sees token ``l`` of frame ``j`` iff
  ``(2^r ≤ s and |k − l| + 1 ≤ s / 2^r)`` or ``(d mod ⌈2^r / s⌉ = 0 and k = l)``: the same and adjacent frames are
  dense, each doubling of ``d`` halves the spatial band (energy decay), and once the band would be thinner than one
  token only the same position is kept in every ``⌈2^r / s⌉``-th frame. About ``s·(3 + 4·log2 F)`` keys per query.
- ``block_size=B`` (the paper uses 128; at most ``s``): the mask the paper's released code builds and its kernels
  run (``decay_factor`` ``δ``: 1 in its HunyuanVideo script, 0.2 in its Wan script). The token band of distance
  ``d`` is ``|k − l| ≤ max(δ·λ_d, B)`` with ``λ_d = 2^{bitlen(s) − bitlen(d)}`` (``d ≤ 1``: dense), and frame pairs
  with ``λ_d < B`` are kept only every ``⌊B / λ_d⌋`` frames; that token mask is rounded to ``B × B`` blocks by the
  paper's strict rule (a block is kept iff more than 60 % of its touched key columns are seen by more than a third
  of its query rows); blocks from the last whole video block on are dense (text). Every kept block is seen entirely.
  Choice: ``B ≤ s`` is required — with several small frames per block the paper's criterion drops even the diagonal
  blocks (every row would see nothing); its models have thousands of tokens per frame.

``dense_first_frame`` (both masks): every query also sees all of frame 0 (the attention sink of the paper's Wan
masks). Default layout ``None`` means ``(N − text_tokens, 1, 1)``: one token per frame, where the token rule keeps frame
distances 0, 1 and the powers of two (log-sparse attention). Self-attention, non-causal; GQA supported.

Why two masks: the token rule is the paper's definition; the block mask is what it measures its speed-ups with (its
kernels are block-sparse FlashInfer/SpargeAttn on 128×128 blocks). On a GPU or a CPU the element-masked token rule
cannot be fast: at paper-like shapes its 64-query tiles see nearly whole frames (the band is ``≥ s/2^r`` wide at every
``r``), so tiled work is about twice the mask's (0.54 vs 0.24 of N² at 64 frames of 256). The block mask has no
masked element at all, so its cost is its density, which falls like ``(3 + 4·log2 F)/F`` in frames: at ``s = 2B``
every kept frame pair is dense at block level and about 4 frames per octave of distance are kept (density 0.45, 0.28,
0.17 at 32, 64, 128 frames of 256 tokens; measured 2.0×, 3.1×, 5.1× SDPA's speed, docs/benchmarks.md).

Fast path ``torch``:
- block mask: :mod:`attnzoo.kernels.block_sparse` — query blocks grouped by their number of visible key blocks, each
  group's keys gathered block-wise (plus the dense text tail) and attended with one batched unmasked SDPA per chunk;
  time ``O(density · N² · d)``, memory O(N·d) plus one bounded chunk (on CPU the backward reruns the flash kernel's
  backward per chunk from the saved log-sum-exp, never the forward).
- token rule: :mod:`attnzoo.kernels.band` — a video query tile is ``T = min(s, 64)`` consecutive positions of one
  frame; its keys are, per key frame, the spatial band the rule allows around the tile (all of frame 0 with the sink),
  plus the text; text queries see every key. One batched SDPA with the cached tile mask per chunk of tiles; work
  ``≈ N · Σ_j (T + 2·reach_j)``, ``O(N·s·log F)`` for ``s ≥ F``.
Fast path ``flex``: FlexAttention with the mask's block mask (cached), forward only on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.band import Tiling, concat_tiles, tiled_attention
from attnzoo.kernels.block_sparse import BlockLayout, block_sparse_attention
from attnzoo.masks import MaskMod
from attnzoo.masks_radial import radial as radial_mod
from attnzoo.masks_radial import radial_block_mod, radial_blocks, radial_reach
from attnzoo.methods.common import masked_attention
from attnzoo.methods.local.common import cached, cached_tiling, flex_attention, flex_serves
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


def _check_decay(value: Any, call: Call) -> str | None:
    if value != 1.0 and call.params.get("block_size") is None:
        return "1.0 unless block_size is set (it scales the band of the paper's deployed block mask)"
    return None


def _check_block(value: Any, call: Call) -> str | None:
    layout = call.params.get("layout")
    spatial = math.prod(layout[1:]) if isinstance(layout, tuple) and layout else 1
    if value > spatial:
        # blocks straddling frames degenerate under the paper's block criterion (a block that holds several small
        # frames loses even its diagonal: every row would see nothing)
        return f"at most the tokens per frame ({spatial}, from layout) for the block mask; None for the token rule"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=generator))

    # video-like shapes: about √video tokens per frame (a power of two dividing the video); from 256 tokens on, no text
    # and the paper's block mask with blocks of a frame (up to 128), the configuration whose speed the bench shows
    text = pick(min(call.seq_q, 4)) if call.seq_q < 256 else 0
    video = call.seq_q - text
    per_frame = 1 << max(0, int(math.log2(max(video, 1))) // 2)
    while video % per_frame:
        per_frame //= 2
    frames = video // per_frame
    if per_frame >= 16:
        block: int | None = min(per_frame, 128)
    else:
        block = (None, 2, 3)[pick(3)] if per_frame >= 3 else None
    return {"layout": (frames, video // frames, 1), "text_tokens": text, "dense_first_frame": bool(pick(2)),
            "block_size": block, "decay_factor": 1.0 if block is None else (1.0, 0.5, 3.0)[pick(3)]}


SPEC = MethodSpec(
    name="radial",
    family="local",
    mechanism="P7",
    paper="Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation",
    arxiv="2506.19852",
    summary="video attention whose spatial band halves as the frame distance doubles (O(n log n)); token rule or the "
            "paper's deployed block mask; text/sink options",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("layout", (tuple,), None, "(frames, h, w) of the video tokens; None means one token per frame",
              check=_check_layout),
        Param("text_tokens", (int,), 0, "text tokens after the video, attending and attended densely", low=0,
              check=_check_text),
        Param("dense_first_frame", (bool,), False, "every query also sees the whole first frame (attention sink)"),
        Param("block_size", (int,), None, "None: the token rule; B: the paper's deployed mask on B×B blocks (128)",
              low=1, check=_check_block),
        Param("decay_factor", (float,), 1.0, "band scale of the block mask (paper: 1 HunyuanVideo, 0.2 Wan)", low=0,
              low_open=True, check=_check_decay),
    ),
    complexity="O(N·s·log F·d) time for s ≥ F tokens per frame (block mask: O(density·N²·d)), O(N·d) working memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def _config(seq: int, layout: Any, text_tokens: int, dense_first_frame: bool) -> Config:
    video = seq - text_tokens
    if layout is None:
        return video, 1, text_tokens, dense_first_frame
    return layout[0], math.prod(layout[1:]), text_tokens, dense_first_frame


def _blocks(config: Config, block: int, decay_factor: float) -> torch.Tensor:
    return cached(("radial-blocks", config, block, decay_factor), torch.device("cpu"),
                  lambda: radial_blocks(*config, block, decay_factor))


def _mod(seq: int, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
         decay_factor: float, device: torch.device) -> tuple[MaskMod, Any]:
    """The mask predicate of a call and a key identifying it."""
    config = _config(seq, layout, text_tokens, dense_first_frame)
    if block_size is None:
        return radial_mod(*config, device), ("radial", config)
    blocks = _blocks(config, block_size, decay_factor).to(device)
    return radial_block_mod(blocks, block_size), ("radial", config, block_size, decay_factor)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    mod, _ = _mod(n, layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
    return masked_attention(q, k, v, masks.dense(mod, b, h, n, n, q.device), scale, mask, bias)


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


def block_layout(seq: int, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int,
                 decay_factor: float, device: torch.device) -> BlockLayout:
    """The cached block-sparse layout of the deployed block mask (the rows of its whole video blocks)."""
    config = _config(seq, layout, text_tokens, dense_first_frame)
    nbv = (seq - text_tokens) // block_size
    return cached(("radial-layout", config, block_size, decay_factor), device, lambda: BlockLayout(
        _blocks(config, block_size, decay_factor)[:nbv].to(device), block_size))


def blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float,
) -> torch.Tensor:
    n = q.shape[2]
    if block_size is not None:
        blocks = block_layout(n, layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
        return block_sparse_attention(q, k, v, scale=scale, layout=blocks, mask=mask, bias=bias)
    config = _config(n, layout, text_tokens, dense_first_frame)
    tiling: Tiling = cached_tiling(("radial", config), q.device, lambda: _tiling(config))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias)


def flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float,
) -> torch.Tensor:
    mod, key = _mod(q.shape[2], layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
    return flex_attention(q, k, v, scale, key, mod)


register(SPEC, reference, [Backend("torch", blockwise), Backend("flex", flex, flex_serves)])
