"""``nn`` layers: projections plus ownership of each method's learnable parts."""

from attnzoo.nn.attention import Attention

__all__ = ["Attention"]
