"""``attnzoo.nn.SingleHeadAttention``: SHViT's single-head self-attention on a channel subset (SHSA, H5).

Paper: "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (Yun, Ro; CVPR 2024;
arXiv:2401.16456), read with the authors' code (github.com/ysj9909/SHViT, ``model/shvit.py``, class ``SHSA``). Most
heads of a multi-head layer are redundant, so SHSA runs *one* head on the first ``partial_dim`` channels only and
lets the other channels pass untouched:

    x = [x₁ | x₂],  x₁ = the first C_p channels of each token (B, N, C_p),  x₂ the other C − C_p
    x̂₁ = GroupNorm₁(x₁)                         one group: statistics over all tokens and channels of a sample
    q, k, v = x̂₁ W_q, x̂₁ W_k, x̂₁ W_v            q, k: qk_dim (16); v: C_p
    o₁ = softmax(q kᵀ / √qk_dim) v               one head, through :func:`attnzoo.attention` (any method)
    y = W_o · ReLU([o₁ | x₂])                     (B, N, C)

Choices: tokens are a sequence ``(B, N, dim)`` (an image's ``H×W`` grid flattened; the attention is global, so the
order does not matter); the paper's convolution-plus-BatchNorm projections (1×1, BatchNorm folded at inference) are
``nn.Linear`` layers with a bias; the default ``partial_dim`` is ``round(dim / 4.67)``, the ratio the paper states
(``r = 1/4.67``); the paper zero-initialises the output BatchNorm's scale so each residual block starts as the
identity — a property of the residual block, which the layer leaves to the model (its output projection has
PyTorch's default initialisation). The group norm mixes statistics over every token, so the layer is noncausal, and
a ``mask`` hides keys from the attention but not from the norm's statistics. The inner ``method`` must serve
self-attention with a value head dim (``partial_dim``) different from the query/key one; its ``**params`` are passed
to every call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import AttnzooError, fail
from attnzoo.registry import get

PARTIAL_RATIO = 4.67  # the paper's r = 1/4.67
QK_DIM = 16


class SingleHeadAttention(nn.Module):
    """SHSA: ``x (B, N, dim) -> (B, N, dim)``, one attention head on the first ``partial_dim`` channels."""

    def __init__(
        self, dim: int, partial_dim: int | None = None, qk_dim: int = QK_DIM, method: str = "softmax",
        backend: str = "auto", **params: Any,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise fail("dim", "an int >= 2 (attended and passed channels)", repr(dim))
        partial_dim = max(1, round(dim / PARTIAL_RATIO)) if partial_dim is None else partial_dim
        if isinstance(partial_dim, bool) or not isinstance(partial_dim, int) or not 1 <= partial_dim <= dim:
            raise fail("partial_dim", f"an int in [1, dim={dim}]", repr(partial_dim))
        if isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 1:
            raise fail("qk_dim", "a positive int", repr(qk_dim))
        spec = get(method).spec
        if "self/noncausal" not in spec.patterns:
            raise fail("method", "a method serving noncausal self-attention", repr(method))
        known = {p.name: p for p in spec.params}
        for name in params:
            if name not in known:
                raise AttnzooError(f"{name}: unknown parameter for method {method!r} (it takes {list(known)})")
        self.params = {n: known[n].validate(v) for n, v in params.items()}
        self.dim, self.partial_dim, self.qk_dim, self.method, self.backend = dim, partial_dim, qk_dim, method, backend
        self.pre_norm = nn.GroupNorm(1, partial_dim)
        self.qkv = nn.Linear(partial_dim, 2 * qk_dim + partial_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise fail("x", f"a (batch, seq, {self.dim}) tensor", f"shape {tuple(x.shape)}")
        attended, passed = x.split([self.partial_dim, self.dim - self.partial_dim], dim=-1)
        normed = self.pre_norm(attended.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(normed).unsqueeze(1).split([self.qk_dim, self.qk_dim, self.partial_dim], dim=-1)
        out = attention(q, k, v, method=self.method, causal=False, mask=mask, backend=self.backend, **self.params)
        return self.proj(F.relu(torch.cat([out.squeeze(1), passed], dim=-1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, partial_dim={self.partial_dim}, qk_dim={self.qk_dim}, method={self.method!r}"
