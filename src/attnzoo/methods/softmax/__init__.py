"""S-family: softmax-form variants (MECHANISMS.md S1–S13)."""

from attnzoo.methods.softmax import sigmoid, softmax  # noqa: F401
