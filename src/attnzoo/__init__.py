"""attnzoo: the attention mechanisms of recent research behind one API.

>>> import attnzoo as az
>>> out = az.attention(q, k, v, method="sigmoid", causal=True)
"""

from attnzoo import methods as _methods  # noqa: F401  (registers every method)
from attnzoo import nn
from attnzoo.api import attention
from attnzoo.errors import AttnzooError
from attnzoo.registry import Method, MethodSpec, Param, get, methods

__all__ = ["AttnzooError", "Method", "MethodSpec", "Param", "attention", "get", "methods", "nn"]
__version__ = "0.1.0"
