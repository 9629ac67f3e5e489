"""H-family: head structure and projections (catalogue IDs H2–H6; each file cites its paper)."""

from attnzoo.methods.heads import key_driven_gqa, moh  # noqa: F401
