"""Q-family: low-precision attention (catalogue IDs Q1–Q2; each file cites its paper)."""

from attnzoo.methods.precision import binary, sage  # noqa: F401
