"""S-family: softmax-form variants (catalogue IDs S1–S13; each file cites its paper)."""

from attnzoo.methods.softmax import (  # noqa: F401
    aaren,
    energy_gated,
    momentum,
    score_mod,
    selective,
    sigmoid,
    slot,
    softmax,
    topk,
    urpe,
)
