"""H-family: head structure and projections (catalogue IDs H2–H6; each file cites its paper)."""

from attnzoo.methods.heads import cca, key_driven_gqa, moh, mqsa, rcmha  # noqa: F401
