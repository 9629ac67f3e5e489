"""attnzoo: the attention mechanisms of recent research behind one API.

>>> import attnzoo as az
>>> out = az.attention(q, k, v, method="sigmoid", causal=True)
>>> out, state = az.prefill(q, k, v, method="lightning")       # methods whose spec says ``decoding``
>>> out_t, state = az.step(state, q_t, k_t, v_t)
>>> out, lse = az.merge([(out_a, lse_a), (out_b, lse_b)])   # attention over disjoint key sets, merged exactly
"""

from attnzoo import methods as _methods  # noqa: F401  (registers every method)
from attnzoo import nn
from attnzoo.api import DecodeState, attention, prefill, step
from attnzoo.errors import AttnzooError
from attnzoo.kernels.merge import merge_parts as merge
from attnzoo.registry import (
    Backend,
    Decoder,
    Method,
    MethodSpec,
    Param,
    Tolerance,
    get,
    methods,
    register_backend,
)

__all__ = [
    "AttnzooError",
    "Backend",
    "DecodeState",
    "Decoder",
    "Method",
    "MethodSpec",
    "Param",
    "Tolerance",
    "attention",
    "get",
    "merge",
    "methods",
    "nn",
    "prefill",
    "register_backend",
    "step",
]
__version__ = "0.1.0"
