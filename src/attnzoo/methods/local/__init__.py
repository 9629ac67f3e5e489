"""P-family: structured sparsity, local windows and neighborhoods (MECHANISMS.md P1–P14)."""

from attnzoo.methods.local import (  # noqa: F401
    axial,
    dilated,
    generalized_neighborhood,
    grouped,
    halo,
    long_short,
    maxvit_block,
    maxvit_grid,
    neighborhood,
    sliding_window,
)
