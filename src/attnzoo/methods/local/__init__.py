"""P-family: structured sparsity, local windows and neighborhoods (MECHANISMS.md P1–P14)."""

from attnzoo.methods.local import axial, dilated, grouped, halo, neighborhood, sliding_window  # noqa: F401
