"""P-family: structured sparsity, local windows and neighborhoods (MECHANISMS.md P1–P14)."""

from attnzoo.methods.local import axial, dilated, halo, neighborhood, sliding_window  # noqa: F401
