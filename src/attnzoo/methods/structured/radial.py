"""P7 — radial attention: a spatial window that shrinks as the temporal distance grows (video, O(n log n)).

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation" (Li et al.,
arXiv:2506.19852).

Formula as implemented: the sequence is ``F × s`` video tokens in frame-major order (``layout = (F, h, w)``, ``s = h·w``
tokens per frame, row-major inside a frame), optionally followed by ``text_tokens`` text tokens that see and are seen
by every token. ``O_i = Σ_{j visible} softmax_j(scale · q_i·k_j + bias_ij) v_j`` where "visible" is the radial mask AND
the user mask. Two masks (predicates in :mod:`attnzoo.masks.radial`, where they are spelt out):

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
kernels are block-sparse FlashInfer/SpargeAttn on 128×128 blocks). The element-masked token rule is the harder one to
make fast: its bands are 1–``s`` tokens wide, so any tiling pays for masked elements (the path below computes about
0.37 of N² for the mask's 0.24 at 64 frames of 256) and runs the flash kernel with an element mask, at about half its
unmasked rate; measured 1.5–1.9× SDPA's forward speed at N = 16384 (fp32, 2 CPU threads; docs/benchmarks.md). The
block mask has no masked element at all, so its cost is its density, which falls like ``(3 + 4·log2 F)/F`` in
frames: at ``s = 2B`` every kept frame pair is dense at block level and about 4 frames per octave of distance are
kept (density 0.45, 0.28, 0.17 at 32, 64, 128 frames of 256 tokens; measured 2.0×, 3.1×, 5.1× SDPA's speed).

Fast path ``torch`` (:func:`torch_sparse`):
- block mask: :mod:`attnzoo.kernels.block_sparse` — query blocks grouped by their number of visible key blocks, each
  group's keys gathered block-wise (plus the dense text tail) and attended with one batched unmasked SDPA per chunk;
  time ``O(density · N² · d)``, memory O(N·d) plus one bounded chunk (on CPU the backward reruns the flash kernel's
  backward per chunk from the saved log-sum-exp, never the forward).
- token rule, on CPU with ``D == Dv`` and no user mask/bias: :mod:`attnzoo.kernels.union` — the visible keys of a
  video query split into disjoint parts, each attended by the CPU flash kernel (which returns the log-sum-exp) and
  merged by log-sum-exp into one output; the backward feeds each part the global output and log-sum-exp (the
  ring-attention identity), no forward recomputation. The parts (:func:`_parts`, cached per configuration): distance
  class ``r = 0`` (``d ≤ 1``: frames ``i−1..i+1``, dense) with whole-frame query tiles whose keys are one contiguous
  range (strided views, no gathered copies, no mask); with the sink, frame 0 as a part of its own for every video
  query (and left out of every class); the text keys as a part; each class ``r ≥ 1`` (``d ∈ [2^r, 2^{r+1})``, both
  sides, the frames the rule keeps) as a part whose tiles are ``T = clamp(w + 1, 8, 64)`` positions (``w`` the band
  half-width) of up to ``ROWS / T = 64 / T`` consecutive frames (at most ``2^{r−1}``), seeing per key frame of the
  class the ``min(T + 2w, s)`` positions around the tile with the element mask ``|k − l| ≤ w`` (and which frame
  pairs are in the class); tiles are grouped by key count and mask, so a group shares one mask. Work
  ``≈ N·Σ_r c_r·(T_r + 2w_r)`` (``c_r`` key frames of class ``r``), 1.5–2× the mask's. Text query rows are one
  SDPA over every key.
- token rule, otherwise (CUDA, ``Dv ≠ D``, a user mask/bias): :mod:`attnzoo.kernels.band` — a video query tile is
  ``T = min(s, 64)`` consecutive positions of one frame; its keys are, per key frame, the spatial band the rule allows
  around the tile (all of frame 0 with the sink), plus the text; text queries see every key. One batched SDPA with
  the cached tile mask per chunk of tiles; work ``≈ N · Σ_j (T + 2·reach_j)``, ``O(N·s·log F)`` for ``s ≥ F``.
Fast path ``flex`` (:func:`flex_block_mask`): FlexAttention with the mask's block mask (cached), forward only on CPU.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's visible keys, so each row's
log-sum-exp is returned. The union kernel returns its merged one, the text rows' comes from
:func:`attnzoo.kernels.dense.attention_lse`, the band kernel returns its tiles'; the block mask then runs on the band
kernel too (:func:`_block_tiling`: one tile per query block, seeing the keys of its kept key blocks, gathered), since
the block-sparse kernel returns no log-sum-exp.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import flex
from attnzoo.kernels.band import Tiling, cached_tiling, concat_tiles, tiled_attention
from attnzoo.kernels.block_sparse import BlockLayout, block_sparse_attention
from attnzoo.kernels.cache import cached
from attnzoo.kernels.dense import attention_lse
from attnzoo.kernels.union import Part, TileGroup, union_attention
from attnzoo.masks import MaskMod
from attnzoo.masks.partitions import block_table
from attnzoo.masks.radial import radial as radial_mod
from attnzoo.masks.radial import radial_blocks, radial_reach
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register

TILE = 64
ROWS = 64  # query rows per tile of a distance class: consecutive frames are stacked up to this
MIN_TILE = 8  # fewest positions in a query tile of a distance class (tiles stack frames up to ROWS rows)

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
    family="structured",
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
    lse=True,
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
    return block_table(blocks, block_size), ("radial", config, block_size, decay_factor)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float, return_lse: bool = False,
) -> Output:
    mod, _ = _mod(q.shape[2], layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


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


def _block_tiling(blocks: torch.Tensor, block: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block mask ``blocks (nb, nb)`` as band-kernel tiles: query block ``a`` (``-1`` pads past ``seq``) sees the
    keys of its kept key blocks (``-1`` pads to the widest row)."""
    q_tiles = torch.arange(blocks.shape[0] * block).view(-1, block)
    q_tiles = torch.where(q_tiles < seq, q_tiles, -1)
    rows = [(torch.nonzero(kept).view(-1, 1) * block + torch.arange(block)).flatten() for kept in blocks]
    k_tiles = torch.nn.utils.rnn.pad_sequence([keys[keys < seq] for keys in rows], batch_first=True, padding_value=-1)
    return q_tiles, k_tiles, ((q_tiles >= 0).unsqueeze(2) & (k_tiles >= 0).unsqueeze(1))


def _frame_groups(frames: int, key_frames: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Query frames grouped by their number ``c`` of key frames: ``c -> (frames (m,), key frames (m, c))``."""
    by_count: dict[int, tuple[list[int], list[list[int]]]] = {}
    for i in range(frames):
        js = key_frames(i)
        if js:
            entry = by_count.setdefault(len(js), ([], []))
            entry[0].append(i)
            entry[1].append(js)
    return {c: (torch.tensor(i_list), torch.tensor(j_lists)) for c, (i_list, j_lists) in by_count.items()}


def _parts(config: Config) -> list[Part]:
    """The token rule of the video rows as disjoint parts (:mod:`attnzoo.kernels.union`), one per distance class.

    Class ``r = 0`` (``d ≤ 1``), with the sink frame and the text keys: whole frames, seen entirely (no mask), by
    tiles of ``min(s, 64)`` positions. Class ``r ≥ 1`` (``d ∈ [2^r, 2^{r+1})`` on both sides, with the frames the
    rule keeps; frame 0 excluded when it is the sink): band half-width ``w = reach``, tiles of
    ``T = clamp(w + 1, MIN_TILE, 64)`` positions, which see per key frame the ``min(T + 2w, s)`` positions around the
    tile (clamped into the frame) with the element mask ``|k − l| ≤ w``. Tiles are grouped by (key-frame count, tile
    mask), so a group's mask is one ``(T, W)`` pattern shared by all its tiles.
    """
    frames, s, text, sink = config
    video = frames * s
    reach = radial_reach(max(frames, 1), s).tolist()
    text_keys = torch.arange(video, video + text)
    parts: list[Part] = []

    def query_tiles(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, s, t)
        pos = starts.unsqueeze(1) + torch.arange(t)
        return starts, torch.where(pos < s, pos, -1)

    # r = 0: frames i-1..i+1 (but frame 0 with the sink) are dense: tiles of a whole frame, their keys one contiguous
    # range (read as strided views, no gathered copies); the sink frame and the text are parts of their own (also
    # contiguous ranges, seen by every video query)
    frame = torch.arange(s)
    near: Part = []
    for c, (fi, fj) in _frame_groups(frames, lambda i: [j for j in (i - 1, i, i + 1)
                                                        if 0 <= j < frames and not (sink and j == 0)]).items():
        near.append(TileGroup(fi.unsqueeze(1) * s + frame, (fj.unsqueeze(2) * s + frame).view(len(fi), c * s), None))
    parts.append(near)
    every = torch.arange(frames).unsqueeze(1) * s + frame
    if sink:
        parts.append([TileGroup(every, frame.expand(frames, s), None)])
    if text:
        parts.append([TileGroup(every, text_keys.expand(frames, text), None)])

    for r in range(1, max(frames - 1, 1).bit_length()):
        ds = [d for d in range(1 << r, min(1 << (r + 1), frames)) if reach[d] >= 0]
        if not ds:
            continue
        w = reach[ds[0]]
        t = min(s, max(MIN_TILE, min(TILE, w + 1)))
        width = min(t + 2 * w, s)
        block = min(max(1, ROWS // t), 1 << (r - 1))  # query frames per tile (their union adds 2·(block − 1) frames)
        starts, pos = query_tiles(t)
        lo = (starts - w).clamp(min=0, max=s - width)
        kpos = lo.unsqueeze(1) + torch.arange(width)  # (na, W)
        band = (starts.view(-1, 1, 1) + torch.arange(t).view(1, -1, 1) - kpos.unsqueeze(1)).abs() <= w  # (na, T, W)
        in_class = torch.zeros(frames, dtype=torch.bool)
        in_class[ds] = True
        groups: dict[tuple[int, bytes], tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
        for i0 in range(0, frames, block):
            fq = torch.arange(i0, min(i0 + block, frames))
            seen = in_class[(fq.unsqueeze(1) - torch.arange(frames)).abs()]  # (Qb, F): key frames of the class
            if sink:
                seen[:, 0] = False
            fk = torch.nonzero(seen.any(dim=0)).squeeze(1)
            if fk.numel() == 0:
                continue
            fm = F.pad(seen[:, fk], (0, 0, 0, block - fq.numel()))  # (Q, c), padding frames see nothing
            fq = F.pad(fq, (0, block - fq.numel()), value=-1)
            c = fk.numel()
            for a in range(starts.shape[0]):
                q = torch.where((fq.unsqueeze(1) >= 0) & (pos[a] >= 0), fq.unsqueeze(1) * s + pos[a], -1).view(-1)
                keys = (fk.unsqueeze(1) * s + kpos[a]).view(-1)
                mask = (fm.view(block, 1, c, 1) & band[a].view(1, t, 1, width)).view(block * t, c * width)
                entry = groups.setdefault((c, mask.numpy().tobytes()), ([], [], mask))
                entry[0].append(q)
                entry[1].append(keys)
        parts.append([TileGroup(torch.stack(qs), torch.stack(ks), mask.unsqueeze(0))
                      for qs, ks, mask in groups.values()])
    return parts


def block_layout(seq: int, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int,
                 decay_factor: float, device: torch.device) -> BlockLayout:
    """The cached block-sparse layout of the deployed block mask (the rows of its whole video blocks)."""
    config = _config(seq, layout, text_tokens, dense_first_frame)
    nbv = (seq - text_tokens) // block_size
    return cached(("radial-layout", config, block_size, decay_factor), device, lambda: BlockLayout(
        _blocks(config, block_size, decay_factor)[:nbv].to(device), block_size))


def torch_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float, return_lse: bool = False,
) -> Output:
    n = q.shape[2]
    config = _config(n, layout, text_tokens, dense_first_frame)
    if block_size is not None and return_lse:
        key = ("radial-block-tiles", config, block_size, decay_factor)
        tiling: Tiling = cached_tiling(key, q.device, lambda: _block_tiling(
            _blocks(config, block_size, decay_factor), block_size, n))
        return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=True)
    if block_size is not None:
        blocks = block_layout(n, layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
        return block_sparse_attention(q, k, v, scale=scale, layout=blocks, mask=mask, bias=bias)
    if q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and mask is None and bias is None:
        parts = cached(("radial-parts", config), q.device, lambda: _parts(config))
        video = config[0] * config[1]
        got = union_attention(q[:, :, :video], k, v, scale=scale, parts=parts, return_lse=return_lse)
        if video == n:
            return got
        if return_lse:
            text, text_lse = attention_lse(q[:, :, video:], k, v, causal=False, scale=scale, mask=None, bias=None)
            return torch.cat([got[0], text], dim=2), torch.cat([got[1], text_lse.to(got[1].dtype)], dim=2)
        text = F.scaled_dot_product_attention(q[:, :, video:], k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return torch.cat([got, text], dim=2)
    tiling = cached_tiling(("radial", config), q.device, lambda: _tiling(config))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, text_tokens: int, dense_first_frame: bool, block_size: int | None,
    decay_factor: float, return_lse: bool = False,
) -> Output:
    mod, key = _mod(q.shape[2], layout, text_tokens, dense_first_frame, block_size, decay_factor, q.device)
    return flex.mask_attention(q, k, v, scale=scale, key=key, mod=mod, return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_sparse, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)])
