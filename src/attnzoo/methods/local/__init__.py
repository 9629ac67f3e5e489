"""P-family: structured sparsity, local windows and neighborhoods (MECHANISMS.md P1–P14)."""

from attnzoo.methods.local import (  # noqa: F401
    axial,
    channel_group,
    concentric_causal,
    dilated,
    grouped,
    halo,
    local_global_latent,
    maxvit_block,
    maxvit_grid,
    neighborhood,
    sliding_window,
    varied_window,
)
