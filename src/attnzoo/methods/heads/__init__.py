"""H-family: head structure and projections (catalogue IDs H1–H6; each file cites its paper)."""

from attnzoo.methods.heads import cca, mqsa, rcmha  # noqa: F401
