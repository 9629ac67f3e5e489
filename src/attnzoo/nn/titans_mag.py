"""``attnzoo.nn.TitansMAG``: Titans' "Memory as a Gate" block — sliding-window attention with persistent memory,
gated by the neural memory.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §4.2 eqs. (26)–(28)
and Figure 3b. As implemented, for ``x (B, N, dim)`` and ``N_p`` learnable persistent tokens ``P`` (§3.3)::

    x̃ = P ‖ x                                           (26)
    y = SW-Attn*(x̃)                                      (27)  queries of x over P (always visible) and a causal
                                                               window of ``window + 1`` keys of x (itself included)
    m = M(x̃)                                              the memory layer (``az.nn.Attention(method=memory)``: Titans'
                                                               parts around ``titans`` or ``titans_mlp``) over x̃
    o = W_o (RMSNorm_y(y) ⊙ σ(RMSNorm_m(m)))              (28)  for the positions of x

Choices (the paper says "⊗ can be any non-linear gating" and "we normalize the outputs y and M(x̃) using learnable
vector-valued weights, followed by a non-linearity σ(.)"): RMSNorms with learnable weights on both branches, a
sigmoid of the memory branch as the gate, one output projection. The attention branch is exact softmax over the union
of the two key sets: the persistent part (noncausal, ``N_p`` keys) and the window part (``sliding_window``) are
computed with their log-sum-exp and merged (:func:`attnzoo.merge`), so no ``N × N`` mask is built. Persistent tokens
start as ``N(0, 0.02²)``. Not here: decoding (a ring of window keys plus the memory state would do it), MAC and MAL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.kernels.merge import merge_parts
from attnzoo.nn.attention import Attention
from attnzoo.nn.checks import positive_int, tokens
from attnzoo.nn.layers.base import channels_to_heads, heads_to_channels

MEMORIES = ("titans", "titans_mlp")


def prefixed_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, window: int,
) -> torch.Tensor:
    """SW-Attn* of Titans' MAG: ``q (B, H, N, D)`` are the queries of the last ``N`` positions of ``k, v
    (B, H, prefix + N, ·)``; each sees the ``prefix`` first keys and the causal window of ``window + 1`` keys of the
    others (itself included); one softmax over both, as a log-sum-exp merge of the two parts."""
    parts = [attention(q, k[:, :, :prefix], v[:, :, :prefix], method="softmax", return_lse=True)] if prefix else []
    parts.append(attention(q, k[:, :, prefix:], v[:, :, prefix:], method="sliding_window", causal=True,
                           window=window, return_lse=True))
    return merge_parts(parts)[0] if len(parts) > 1 else parts[0][0]


class TitansMAG(nn.Module):
    """Memory as a Gate: ``x (B, N, dim) → (B, N, dim)``, causal.

    ``window`` (≥ 1): keys each query sees before itself in the attention branch; ``persistent``: learnable tokens
    before the sequence (``N_p``, 0 for none); ``memory``: ``"titans"`` (matrix memory) or ``"titans_mlp"`` (deep
    memory); ``**memory_params``: that method's fixed parameters (``chunk_size``, ``loss``...)."""

    def __init__(self, dim: int, heads: int, window: int = 256, persistent: int = 4, memory: str = "titans",
                 **memory_params: Any) -> None:
        super().__init__()
        if memory not in MEMORIES:
            raise fail("memory", f"one of {list(MEMORIES)}", repr(memory))
        if isinstance(persistent, bool) or not isinstance(persistent, int) or persistent < 0:
            raise fail("persistent", "an int >= 0", repr(persistent))
        self.heads, self.window, self.dim = heads, positive_int("window", window), dim
        self.persistent = nn.Parameter(0.02 * torch.randn(persistent, dim))
        self.memory = Attention(dim, heads, method=memory, causal=True, **memory_params)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm_y, self.norm_m = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = tokens("x", x, self.dim).shape[0]
        prefix = self.persistent.shape[0]
        xt = torch.cat([self.persistent.to(x.dtype).expand(b, -1, -1), x], dim=1)
        q, k, v = (channels_to_heads(t, self.heads) for t in self.qkv(xt).chunk(3, dim=-1))
        y = heads_to_channels(prefixed_window_attention(q[:, :, prefix:], k, v, prefix, self.window))
        m = self.memory(xt)[:, prefix:]
        return self.out(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))
