"""``attnzoo.nn.MoHAttention``: mixture-of-head attention, the layer that owns MoH's routers (arXiv:2410.11842).

An :class:`~attnzoo.nn.attention.Attention` with ``method="moh"`` whose parts are a
:class:`~attnzoo.nn.layers.moh.MoHRouter` with the given split of heads: ``shared_heads`` always-on heads (the first
ones) and ``top_k`` of the other ``heads − shared_heads`` routed heads per token. The kernel
(:mod:`attnzoo.methods.heads.moh`) computes only the routed (token, head) pairs. After each forward,
:attr:`MoHAttention.load_balance_loss` holds the batch's load-balance loss; :func:`balance_loss` sums it over every MoH
layer of a model, for ``loss = task_loss + 0.01 * balance_loss(model)`` (the paper's β = 0.01).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.nn.attention import Attention
from attnzoo.nn.layers.moh import MoHRouter
from attnzoo.registry import LayerInfo


class MoHAttention(Attention):
    """Mixture-of-head attention ``x (B, N, dim) -> (B, N, dim)``.

    ``shared_heads`` (default a quarter of the heads) are always on; each token keeps ``top_k`` of the routed heads
    (default: about 75 % of all heads run). ``**kwargs`` are :class:`Attention`'s (``kv_heads``, ``causal``,
    ``context_dim``, ``qkv_bias``, ``backend``...).
    """

    def __init__(
        self, dim: int, heads: int, shared_heads: int | None = None, top_k: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(dim, heads, method="moh", **kwargs)  # faithful: refuses a head_weights passed in
        info = LayerInfo(heads=heads, kv_heads=self.kv_heads, head_dim=self.head_dim, params=self.fixed, dim=dim)
        self.parts = MoHRouter(info, shared_heads, top_k)

    @property
    def router(self) -> MoHRouter:
        assert isinstance(self.parts, MoHRouter)
        return self.parts

    @property
    def load_balance_loss(self) -> torch.Tensor | None:
        """The load-balance loss of the last forward's batch (None before the first)."""
        return self.router.balance_loss


def balance_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the last forward's load-balance losses of every MoH router in ``model`` (0 if none ran)."""
    losses = [m.balance_loss for m in model.modules() if isinstance(m, MoHRouter) and m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
