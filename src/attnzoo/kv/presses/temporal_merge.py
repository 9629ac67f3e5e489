"""K14 — temporal cache merging: near-duplicate keys of consecutive video frames share one slot that keeps their weight.

Paper: "Fast Autoregressive Video Diffusion and World Models with Temporal Cache Compression and Sparse Attention"
(Samuel et al., arXiv:2602.01801), its TempCache module. Autoregressive video models cache every frame's tokens; static
content gives near-identical keys frame after frame. TempCache links each token to its temporal correspondent (its
nearest key in the previous frame) and merges linked tokens, which bounds the cache's growth.

The rule that keeps merging exact: if ``n`` cached tokens share one key ``k``, their softmax terms are
``n·exp(q·k)`` times the mean of their values. So a merged slot holds

- key: the count-weighted mean of its tokens' keys (exactly ``k`` for identical keys),
- value: the count-weighted mean of their values,
- ``log_weight = log(count)``, added to its scores (:meth:`~attnzoo.kv.cache.KVCache.scores`),
- position: its newest token's (so the slot is "in" the latest frame it covers and can link to the next one),

and attention over the merged cache equals attention over the tokens it replaces when the merged keys are identical.

As implemented here (one ``(sequence, kv head)`` row at a time, frames of ``tokens_per_frame`` positions, frame
``f = position // tokens_per_frame``): every slot of frame ``f >= 1`` finds its most cosine-similar slot in frame
``f - 1``; the link is taken if the similarity is at least ``threshold``, or, with ``compression_ratio``, the most
similar links of the row are taken until ``tokens − floor(tokens·ratio)`` slots remain (each link removes one slot;
the ratio is honoured up to the links available: tokens of the first frame have none). Linked slots form groups
across frames; each group becomes one slot. At prefill every frame may link; after a decoding step the links into the
frame that token completed are made (slots of earlier frames were decided before). ``tokens`` counts the tokens a row
has seen (merged slots count their tokens). A frame links once, when complete (all its ``tokens_per_frame`` tokens
seen); several tokens may pick the same correspondent, and a merged group is every slot linked to it, transitively.
Matching compares each frame with the previous one only (slots laid on a grid of frames by position), so it costs
O(tokens · tokens_per_frame) — exact nearest neighbours where the paper uses approximate ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, check_ratio, register_press, top_slots

DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class TemporalMergePress(Press):
    """Merge near-duplicate keys of consecutive frames of ``tokens_per_frame`` positions.

    ``threshold``: the cosine similarity from which a token merges with its correspondent in the previous frame
    (default 0.95). ``compression_ratio``: if > 0, merge the most similar links instead, until that fraction of the
    tokens is removed (``threshold`` then unused).
    """

    tokens_per_frame: int
    threshold: float = DEFAULT_THRESHOLD
    compression_ratio: float = 0.0

    def __post_init__(self) -> None:
        tpf = self.tokens_per_frame
        if isinstance(tpf, bool) or not isinstance(tpf, int) or tpf < 1:
            raise fail("tokens_per_frame", "a positive int (tokens in one frame)", repr(tpf))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 <= t <= 1.0:
            raise fail("threshold", "a cosine similarity in [-1, 1]", repr(t))
        check_ratio(self.compression_ratio)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        return cls(compression_ratio=1.0 - fraction, **options)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        return merge_frames(cache, self.tokens_per_frame, self.threshold, self.compression_ratio,
                            torch.ones_like(cache.length))

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        done = cache.length % self.tokens_per_frame == 0  # the step's token completed its frame
        frame = torch.where(done, (cache.length - 1) // self.tokens_per_frame, torch.iinfo(torch.long).max)
        if not bool((done & (frame >= 1)).any()):
            return cache
        return merge_frames(cache, self.tokens_per_frame, self.threshold, self.compression_ratio, frame)


def merge_frames(
    cache: KVCache, tokens_per_frame: int, threshold: float, ratio: float, first_frame: torch.Tensor,
) -> KVCache:
    """The cache with the slots of complete frames ``>= first_frame[b]`` linked to their previous frame's slots, and
    each group of linked slots merged into one slot (see the module)."""
    b, hkv, n = cache.positions.shape
    pos = cache.positions.long()
    occupied = pos >= 0
    dtype = torch.promote_types(cache.keys.dtype, torch.float32)
    counts = torch.ones_like(pos, dtype=dtype) if cache.log_weight is None else cache.log_weight.to(dtype).exp()
    counts = torch.where(occupied, counts, 0.0)
    frame = torch.where(occupied, pos // tokens_per_frame, -2)
    complete = (cache.length // tokens_per_frame - 1).view(b, 1, 1)  # the last frame all of whose tokens came
    may_link = (frame >= first_frame.view(b, 1, 1)) & (frame <= complete) & (frame >= 1)
    slot = torch.arange(n, device=pos.device).expand(b, hkv, n)
    best, parent = _correspondents(F.normalize(cache.keys.float(), dim=-1), pos, may_link, tokens_per_frame)
    if ratio > 0:
        tokens = counts.sum(-1)
        links = (occupied.sum(-1) - (tokens - torch.floor(tokens * ratio))).clamp(min=0)  # slots to remove
        rank = torch.sort(best, stable=True, dim=-1, descending=True).indices.argsort(-1)
        linked = (rank < links.unsqueeze(-1)) & torch.isfinite(best)
    else:
        linked = best >= threshold
    if not bool(linked.any()):
        return cache
    root = torch.where(linked, parent, slot)
    for _ in range(max(1, math.ceil(math.log2(n)))):  # pointer jumping: every slot reaches its group's oldest slot
        root = root.gather(2, root)
    merged = _merge(cache, root, counts)
    keep = occupied & ~linked
    index = top_slots(keep.float(), cache, keep.sum(-1))
    log_weight = merged.pop("counts").clamp(min=1).log().gather(2, index.clamp(min=0))
    return replace(cache, **merged).keep(index, log_weight=torch.where(index >= 0, log_weight, 0.0))


def _correspondents(
    unit: torch.Tensor, pos: torch.Tensor, may_link: torch.Tensor, tokens_per_frame: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each linking slot's cosine similarity to its most similar slot of the previous frame and that slot's index,
    ``(B, Hkv, L)`` each (``-inf`` and the slot itself where it may not link).

    The slots are laid on a grid of frames by position (only the frames from the one before the earliest linking
    slot's to the latest linking one), so each frame is compared with the previous one only: O(L·tokens_per_frame).
    """
    b, hkv, n = pos.shape
    tpf = tokens_per_frame
    slot = torch.arange(n, device=pos.device).expand(b, hkv, n)
    none = (torch.full(pos.shape, -math.inf, device=pos.device), slot)
    linking = pos[may_link]
    if linking.numel() == 0:
        return none
    lo = (int(linking.min()) // tpf - 1) * tpf
    width = (int(linking.max()) // tpf + 1) * tpf - lo
    cell = pos - lo
    in_grid = (cell >= 0) & (cell < width)
    cell_slot = torch.full((b, hkv, width + 1), -1, device=pos.device).scatter(2, torch.where(in_grid, cell, width),
                                                                                slot)[:, :, :width]
    grid = unit.gather(2, cell_slot.clamp(min=0).unsqueeze(-1).expand(b, hkv, width, unit.shape[-1]))
    frames = width // tpf
    grid = grid.view(b, hkv, frames, tpf, -1)
    empty = (cell_slot < 0).view(b, hkv, frames, tpf)
    sim = (grid[:, :, 1:] @ grid[:, :, :-1].transpose(-1, -2)).masked_fill(empty[:, :, :-1].unsqueeze(-2), -math.inf)
    best, arg = sim.max(-1)  # (B, Hkv, frames - 1, tpf): per cell of frames 1.., its match in the previous frame
    parent = cell_slot.gather(2, (torch.arange(frames - 1, device=pos.device).view(1, 1, -1, 1) * tpf + arg).flatten(2))
    at = (cell - tpf).clamp(0, (frames - 1) * tpf - 1)
    ok = may_link & in_grid
    return (torch.where(ok, best.flatten(2).gather(2, at), -math.inf),
            torch.where(ok, parent.gather(2, at), slot))


def _merge(cache: KVCache, root: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per slot (meaningful at each group's oldest slot): the count-weighted mean key and value of its group, its total
    count and its newest position."""
    total = torch.zeros_like(counts).scatter_add_(2, root, counts)
    out: dict[str, torch.Tensor] = {"counts": total}
    for name, t in (("keys", cache.keys), ("values", cache.values)):
        summed = torch.zeros(t.shape, dtype=counts.dtype, device=t.device).scatter_add_(
            2, root.unsqueeze(-1).expand(t.shape), t.to(counts.dtype) * counts.unsqueeze(-1))
        out[name] = (summed / total.clamp(min=1e-30).unsqueeze(-1)).to(t.dtype)
    newest = torch.full_like(cache.positions, -1).scatter_reduce(2, root, cache.positions, "amax")
    out["positions"] = newest
    return out


register_press(TemporalMergePress, "K14",
               "Fast Autoregressive Video Diffusion and World Models with Temporal Cache Compression and Sparse "
               "Attention", "2602.01801",
               "merge near-duplicate keys of consecutive frames (TempCache); merged slots keep log(count)", ("frames",))
