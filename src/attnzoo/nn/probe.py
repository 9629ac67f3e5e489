"""``attnzoo.nn.AttentiveProbe``: efficient probing (EP), multi-query cross-attention pooling over frozen tokens.

Paper: "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling" (Psomas et al.,
arXiv:2506.10178; code github.com/billpsomas/efficient-probing, ``poolings/ep.py`` and ``probe_heads.py``). Attentive
probing pools a frozen backbone's patch tokens with attention instead of reading one [CLS] token; EP removes the
projections that multi-head cross-attention spends on it:

    a_j = softmax_n(scale · q_j · x_n)                 M learned queries q_j ∈ R^C, keys = the tokens themselves
    V   = x W_v,   W_v: C → C / d_out                    the one projection kept (reduced by d_out)
    y_j = Σ_n a_jn V_n[slice j],   y = [y_1; …; y_M]     query j aggregates only its own C / (d_out·M) channels

- No query, key or output projection: the queries live in the token space (``scale = C^{-1/2}``, the code's
  ``head_dim^{-0.5}`` with one head), and the M attention maps each fill one slice of the pooled vector, as heads do in
  multi-head attention. Width of ``y``: ``C / d_out`` (``d_out`` = 1 keeps ``C``).
- Queries initialised ``0.02 · N(0, 1)`` as in the code; ``W_v`` a ``nn.Linear`` (bias off, ``qkv_bias`` turns it
  on).
- ``num_classes``: the probe head of the paper's code, ``BatchNorm1d(affine=False, eps=1e-6)`` then a linear
  classifier on ``y``; None returns ``y`` itself.
- Computed as ``M`` heads of one query each over the same keys (``x`` expanded per head, no copy) and their own value
  slices, by :func:`attnzoo.attention` with ``method`` (``"softmax"``, the paper's; any noncausal method serving
  cross-attention can be tried). ``mask (B, N)`` bool hides padding tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.nn.checks import padding_mask, positive_int, tokens


class AttentiveProbe(nn.Module):
    """EP pooling ``x (B, N, dim) -> (B, dim // d_out)``, or class logits ``(B, num_classes)`` if ``num_classes``."""

    def __init__(self, dim: int, num_queries: int = 32, d_out: int = 1, num_classes: int | None = None,
                 qkv_bias: bool = False, method: str = "softmax", backend: str = "auto", **params: Any) -> None:
        super().__init__()
        self.dim, self.num_queries = positive_int("dim", dim), positive_int("num_queries", num_queries)
        self.d_out = positive_int("d_out", d_out)
        if dim % d_out or (dim // d_out) % num_queries:
            raise fail("num_queries", f"a divisor of dim // d_out = {dim // d_out} (dim={dim}, d_out={d_out})",
                       num_queries)
        self.width = dim // d_out
        self.method, self.backend, self.params = method, backend, params
        self.queries = nn.Parameter(0.02 * torch.randn(num_queries, dim))
        self.v = nn.Linear(dim, self.width, bias=qkv_bias)
        self.head: nn.Module | None = None
        if num_classes is not None:
            positive_int("num_classes", num_classes)
            self.head = nn.Sequential(nn.BatchNorm1d(self.width, affine=False, eps=1e-6),
                                      nn.Linear(self.width, num_classes))

    def pool(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled vector ``y (B, dim // d_out)`` of tokens ``x (B, N, dim)``."""
        b, n, _ = tokens("x", x, self.dim).shape
        padding_mask(mask, x)
        m = self.num_queries
        q = self.queries.to(x.dtype).view(1, m, 1, self.dim).expand(b, -1, -1, -1)
        k = x.unsqueeze(1).expand(-1, m, -1, -1)
        v = self.v(x).view(b, n, m, self.width // m).transpose(1, 2)
        hidden = None if mask is None else mask.view(b, 1, 1, n)
        y = attention(q, k, v, method=self.method, mask=hidden, backend=self.backend, **self.params)
        return y.reshape(b, self.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pool(x, mask)
        return y if self.head is None else self.head(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_queries={self.num_queries}, d_out={self.d_out}, method={self.method!r}"
