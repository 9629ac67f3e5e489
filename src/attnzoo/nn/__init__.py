"""``nn`` layers: projections plus ownership of each method's learnable parts."""

from attnzoo.nn.attention import Attention
from attnzoo.nn.seer import SeerAttention

__all__ = ["Attention", "SeerAttention"]
