"""P-family: structured sparsity, local windows and neighborhoods (catalogue IDs P1–P14; each file cites its paper)."""

from attnzoo.methods.structured import (  # noqa: F401
    axial,
    channel_group,
    concentric_causal,
    dilated,
    generalized_neighborhood,
    grouped,
    halo,
    local_global_latent,
    long_short,
    maxvit,
    neighborhood,
    radial,
    sliding_window,
    varied_window,
)
