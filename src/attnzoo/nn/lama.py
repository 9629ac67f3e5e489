"""``attnzoo.nn.LAMAPooling``: low-rank factorised multi-head attention pooling (LAMA).

Paper: "Low Rank Factorization for Compact Multi-Head Self-Attention" (Mehta, Rangwala, Ramakrishnan;
arXiv:1912.00835). A sentence's token states ``h_t ∈ R^d`` (a GRU's, in the paper) are pooled into a structured
representation of ``m`` heads, each an attention distribution over the tokens. Two savings over multi-head
self-attention: the tokens query one global context vector ``c`` instead of each other, and the heads' bilinear
affinities ``h_tᵀ W_j c`` are a low-rank factorisation ``W_j = q_j p_jᵀ`` sharing two ``d × m`` matrices ``P, Q``
rather than ``m`` full matrices (low-rank bilinear pooling, the Hadamard-product form of Kim et al. 2016)::

    s_jt = tanh((p_j · c)(q_j · h_t)),     a_j = softmax_t(s_j),     M_j = Σ_t a_jt h_t,     out = [M_1; …; M_m]

- ``c`` is learned (a context vector like the word-level one of hierarchical attention networks), which is our
  reading of the paper's global context vector; ``P``, ``Q``, ``c`` are Xavier-uniform initialised.
- As attention: the ``m`` heads are ``m`` query rows ``(p_j · c) q_j`` over the keys ``h_t``, values ``h_t``, and
  ``tanh`` of the logits is logit soft-capping with cap 1 and scale 1 — the registered ``score_mod`` method
  (``softcap=1.0``), so the pooling runs through :func:`attnzoo.attention` with its masks and backends.
- ``mask (B, T)`` bool hides padding tokens. Output ``(B, m·d)`` (flattened), or ``(B, m, d)`` with
  ``flatten=False``. Parameters: ``2·d·m + d`` against MHSA's ``~4·d²``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.nn.checks import padding_mask, positive_int, tokens


class LAMAPooling(nn.Module):
    """LAMA pooling ``h (B, T, dim) -> (B, heads · dim)`` (or ``(B, heads, dim)`` with ``flatten=False``)."""

    def __init__(self, dim: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = positive_int("dim", dim), positive_int("heads", heads)
        self.backend = backend
        self.p, self.q = (nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, heads))) for _ in range(2))
        self.context = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, 1)).view(dim))

    def head_queries(self) -> torch.Tensor:
        """The heads as query rows ``(p_j · c) q_j``, ``(heads, dim)``."""
        return (self.p.t() @ self.context).unsqueeze(-1) * self.q.t()

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, flatten: bool = True) -> torch.Tensor:
        b, t, _ = tokens("h", h, self.dim).shape
        padding_mask(mask, h)
        q = self.head_queries().to(h.dtype).view(1, 1, self.heads, self.dim).expand(b, -1, -1, -1)
        kv = h.unsqueeze(1)
        hidden = None if mask is None else mask.view(b, 1, 1, t)
        pooled = attention(q, kv, kv, method="score_mod", scale=1.0, softcap=1.0, mask=hidden, backend=self.backend)
        pooled = pooled.view(b, self.heads, self.dim)
        return pooled.reshape(b, self.heads * self.dim) if flatten else pooled

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"
