"""Mask predicates of radial attention (P7), token level and block level.

"Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation" (Li et al.,
arXiv:2506.19852). The sequence is a video of ``F`` frames of ``s`` tokens each (frame-major) followed by ``text``
tokens; ``i, j`` are frame indices, ``k, l`` positions inside a frame, ``d = |i − j|``.

Token rule (the paper's Sec. 4.1, :func:`radial`): with ``r = ⌊log2 max(d, 1)⌋``, query ``(i, k)`` sees key ``(j, l)``
iff ``(2^r ≤ s and |k − l| + 1 ≤ s / 2^r)`` or ``(d mod ⌈2^r / s⌉ = 0 and k = l)``: the spatial band halves each time
the frame distance doubles, and once it would be thinner than one token only the same position is kept, in every
``⌈2^r / s⌉``-th frame.

Deployed rule (the mask the paper's released code builds and its kernels run, :func:`radial_blocks`), for a block size
``B`` and a ``decay_factor`` ``δ``. With ``P = 2^{bitlen(s)}`` (``bitlen(x) = ⌊log2 x⌋ + 1``, ``bitlen(0) = 0``), the
*decay length* of distance ``d`` is ``λ_d = P / 2^{bitlen(d)}``; a frame pair is kept iff ``λ_d ≥ B`` or
``d mod ⌊B / λ_d⌋ = 0``; inside a kept pair, tokens see each other iff ``d ≤ 1`` or ``|k − l| ≤ max(δ·λ_d, B)``. This
token mask is then rounded to ``B × B`` blocks by the paper's "strict shrink": in the block pair of query block ``a``
and key block ``b``, let a key column's density be the fraction of the block's ``B`` query rows that see it; the
block is kept iff more than 60 % of the columns with non-zero density have density above 1/3 (integers:
``5·#{3·c > B} > 3·#{c > 0}``). Kept blocks are seen entirely, the others not at all. Blocks from the last whole video
block on (a partial video block, text) are dense rows and columns, as in the paper. The released code shrinks each
frame pair's piece separately and ORs the pieces; here the criterion sees the whole block, which is the same whenever
``B`` divides ``s`` (blocks never straddle frames) and is defined for every ``s``.

Option of both rules: ``dense_first_frame`` — every query also sees the whole first frame (the attention sink of the
paper's Wan masks).
"""

from __future__ import annotations

import torch

from attnzoo.masks.core import MaskMod

__all__ = ["radial", "radial_blocks", "radial_deployed", "radial_reach"]


def radial_reach(frames: int, spatial: int) -> torch.Tensor:
    """``reach[d]`` for frame distance ``d < frames``: the largest ``|k − l|`` the token rule allows (``-1``: none).

    ``2^r ≤ s`` → ``⌊s / 2^r⌋ − 1`` (from ``|k − l| + 1 ≤ s / 2^r``); otherwise ``0`` if ``d mod ⌈2^r / s⌉ = 0`` (same
    position only), else ``-1``.
    """
    reach = []
    for d in range(frames):
        p = 1 << (max(d, 1).bit_length() - 1)  # 2^⌊log2 max(d, 1)⌋
        reach.append(spatial // p - 1 if p <= spatial else (0 if d % -(-p // spatial) == 0 else -1))
    return torch.tensor(reach, dtype=torch.long)


def _frame_rule(reach: torch.Tensor, width: torch.Tensor, frames: int, spatial: int, text: int,
                dense_first_frame: bool) -> MaskMod:
    """Video tokens ``(i, k)``, ``(j, l)`` see each other iff ``|k − l| ≤ reach[|i − j|]`` (as float ``width`` when
    given); then the sink and the text rows/columns."""
    video = frames * spatial

    def radial_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        fq, fk = q_idx // spatial, kv_idx // spatial
        distance = torch.clamp((fq - fk).abs(), max=frames - 1)
        seen = (q_idx % spatial - kv_idx % spatial).abs() <= (reach if width is None else width)[distance]
        if dense_first_frame:
            seen = seen | (fk == 0)
        if text:
            seen = seen | (q_idx >= video) | (kv_idx >= video)
        return seen

    return radial_mod


def radial(frames: int, spatial: int, text: int, dense_first_frame: bool, device: torch.device | str) -> MaskMod:
    """The token rule on flat indices: ``frames × spatial`` video tokens (frame-major) then ``text`` tokens."""
    return _frame_rule(radial_reach(frames, spatial).to(device), None, frames, spatial, text, dense_first_frame)


def radial_deployed(frames: int, spatial: int, dense_first_frame: bool, block: int, decay_factor: float,
                    device: torch.device | str = "cpu") -> MaskMod:
    """The deployed token mask (before the block rounding) on the video tokens: see the module docstring."""
    p = 1 << spatial.bit_length()
    width = []
    for d in range(frames):
        decay = p / (1 << d.bit_length())
        kept = decay >= block or d % int(block / decay) == 0
        width.append(-1.0 if not kept else float(spatial) if d <= 1 else max(decay_factor * decay, float(block)))
    return _frame_rule(None, torch.tensor(width, dtype=torch.float64, device=device), frames, spatial, 0,
                       dense_first_frame)


def _strict_shrink(counts: torch.Tensor, block: int) -> torch.Tensor:
    """The paper's block criterion from per-column counts ``(…, B)`` of visible rows (out of ``B``)."""
    nonzero = (counts > 0).sum(dim=-1)
    high = (3 * counts > block).sum(dim=-1)
    return 5 * high > 3 * nonzero


ROWS_PER_STEP = 1 << 24  # predicate evaluations per step of the general (unaligned) builder


def radial_blocks(frames: int, spatial: int, text: int, dense_first_frame: bool, block: int,
                  decay_factor: float) -> torch.Tensor:
    """The deployed block mask ``(nb, nb)`` (``nb = ⌈(F·s + text) / B⌉``) on CPU: True = block pair seen.

    When ``B`` divides ``s`` a block pair inside frame pair ``(i, j)`` depends only on ``|i − j|`` and the two
    in-frame block positions: one ``s × s`` token mask per distance (``O(F·s²)``). Otherwise every video block row is
    evaluated against the video keys (``O((F·s)²)``), a few rows at a time.
    """
    video = frames * spatial
    n = video + text
    nb, nbv = -(-n // block), video // block
    out = torch.ones(nb, nb, dtype=torch.bool)
    mod = radial_deployed(frames, spatial, dense_first_frame, block, decay_factor)
    if nbv == 0:
        return out
    if spatial % block == 0:
        m = spatial // block
        k = torch.arange(spatial)
        q_idx, kv_idx = k.view(-1, 1), k.view(1, -1)
        pair = torch.stack([
            _strict_shrink(mod(None, None, q_idx, kv_idx + d * spatial).view(m, block, m, block).sum(dim=1), block)
            for d in range(frames)
        ])  # (F, m, m): query frame 0, key frame d (the sink is set below)
        i = torch.arange(frames)
        distance = (i.view(-1, 1) - i.view(1, -1)).abs()
        video_blocks = pair[distance].permute(0, 2, 1, 3).reshape(nbv, nbv)
        if dense_first_frame:
            video_blocks[:, :m] = True
    else:
        keys = torch.arange(nbv * block).view(1, -1)
        step = max(1, ROWS_PER_STEP // (block * nbv * block))
        video_blocks = torch.cat([
            _strict_shrink(
                mod(None, None, torch.arange(a * block, min(a + step, nbv) * block).view(-1, 1), keys)
                .view(-1, block, nbv, block).sum(dim=1), block)
            for a in range(0, nbv, step)
        ])
    out[:nbv, :nbv] = video_blocks
    return out
