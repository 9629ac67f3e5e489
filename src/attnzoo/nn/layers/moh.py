"""MoH's routers around its kernel (H3, :mod:`attnzoo.methods.heads.moh`).

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan; arXiv:2410.11842), read with
the authors' public code (SkyworkAI/MoH, ``MoH-ViT/attention.py``). :class:`MoHRouter` computes the kernel's
``head_weights`` from each token ``x_t`` of the layer's input (:func:`attnzoo.methods.heads.moh.route`):

- ``routed``: ``W_r`` (``dim → H − h_s``, no bias), top ``top_k`` of its softmax per token;
- ``shared``: ``W_s`` (``dim → h_s``, no bias) when ``h_s > 1``; one shared head has the constant weight 1;
- ``groups``: ``W_h`` (``dim → 2``, no bias), the two-group balance ``[α1, α2]``, when ``h_s > 0``.

Each forward stores the batch's load-balance loss in :attr:`MoHRouter.balance_loss` (add ``β · balance_loss``,
β = 0.01 in the paper, to the task loss; :func:`attnzoo.nn.moh.balance_loss` sums it over a model) and the routing
decision in :attr:`MoHRouter.selected`. The routers' weights are PyTorch's default ``nn.Linear`` initialisation (the
public code's).

``az.nn.Attention(dim, heads, method="moh")`` builds these with :func:`default_shared_heads` and
:func:`default_top_k`; ``az.nn.MoHAttention`` takes them as arguments. Each token's weights depend on that token only,
so a causal layer stays causal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.errors import fail
from attnzoo.methods.heads.moh import route
from attnzoo.nn.layers.base import LayerParts, register_layer
from attnzoo.registry import LayerInfo


def default_shared_heads(heads: int) -> int:
    """A quarter of the heads shared (rounded down): our default, between the paper's configurations."""
    return heads // 4


def default_top_k(heads: int, shared_heads: int) -> int:
    """Routed heads kept per token so that about 75 % of all heads run (the paper's MoH-LLaMA3 ratio), at least 1."""
    return min(heads - shared_heads, max(1, round(0.75 * heads) - shared_heads))


class MoHRouter(LayerParts):
    """MoH's routers: ``head_weights (B, H, N)`` for the kernel from ``x (B, N, dim)``, for the layer ``info``
    (``dim``, ``heads``); ``shared_heads`` and ``top_k`` default to :func:`default_shared_heads` and
    :func:`default_top_k`."""

    computes = ("head_weights",)

    def __init__(self, info: LayerInfo, shared_heads: int | None = None, top_k: int | None = None) -> None:
        super().__init__()
        dim, heads = info.dim, info.heads
        shared_heads = default_shared_heads(heads) if shared_heads is None else shared_heads
        if isinstance(shared_heads, bool) or not isinstance(shared_heads, int) or not 0 <= shared_heads < heads:
            raise fail("shared_heads", f"an int in [0, {heads - 1}] (at least one head must be routed)",
                       repr(shared_heads))
        routed = heads - shared_heads
        top_k = default_top_k(heads, shared_heads) if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= routed:
            raise fail("top_k", f"an int in [1, {routed}] (the routed heads: heads - shared_heads)", repr(top_k))
        self.heads, self.shared_heads, self.top_k = heads, shared_heads, top_k
        self.routed = nn.Linear(dim, routed, bias=False)
        self.shared = nn.Linear(dim, shared_heads, bias=False) if shared_heads > 1 else None
        self.groups = nn.Linear(dim, 2, bias=False) if shared_heads > 0 else None
        self.balance_loss: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        routing = route(
            self.routed(x), self.top_k, self.shared_heads,
            None if self.shared is None else self.shared(x), None if self.groups is None else self.groups(x),
        )
        self.balance_loss, self.selected = routing.balance_loss, routing.selected
        return q, k, v, {"head_weights": routing.weights.transpose(1, 2).to(q.dtype)}

    def extra_repr(self) -> str:
        return f"heads={self.heads}, shared_heads={self.shared_heads}, top_k={self.top_k}"


register_layer("moh", MoHRouter)
