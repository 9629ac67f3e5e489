"""P-family: structured sparsity, local windows and neighborhoods (MECHANISMS.md P1–P14)."""

from attnzoo.methods.local import neighborhood, sliding_window  # noqa: F401
