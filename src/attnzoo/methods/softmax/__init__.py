"""S-family: softmax-form variants (MECHANISMS.md S1–S13)."""

from attnzoo.methods.softmax import (  # noqa: F401
    momentum,
    score_mod,
    selective,
    sigmoid,
    softmax,
    topk,
    urpe,
)
