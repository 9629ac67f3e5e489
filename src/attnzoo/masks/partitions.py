"""Non-overlapping partitions of a row-major layout (MaxViT windows and grids) and block tables as predicates."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.masks.core import MaskMod
from attnzoo.masks.layouts import per_axis

__all__ = ["block_table", "grid", "window_partition"]


def window_partition(layout: Sequence[int], window: Sequence[int]) -> MaskMod:
    """MaxViT block attention: same non-overlapping window on every axis (``x_q // P == x_k // P``)."""
    return per_axis(layout, lambda xq, xk, a: (xq // window[a]) == (xk // window[a]), "window_partition_mod")


def grid(layout: Sequence[int], grid_size: Sequence[int]) -> MaskMod:
    """MaxViT grid attention: each axis is split as ``x = g · (L/G) + r``; tokens with equal ``r`` on every axis
    attend to each other (a sparse, dilated ``G × G`` grid spanning the whole layout)."""
    return per_axis(
        layout, lambda xq, xk, a: (xq % (layout[a] // grid_size[a])) == (xk % (layout[a] // grid_size[a])), "grid_mod"
    )


def block_table(blocks: torch.Tensor, block: int) -> MaskMod:
    """A block mask ``(nb_q, nb_kv)`` as a predicate: query ``x`` sees key ``y`` iff ``blocks[x // B, y // B]``."""

    def block_table_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return blocks[q_idx // block, kv_idx // block]

    return block_table_mod
