"""The pieces Titans' blocks share (:class:`~attnzoo.nn.TitansMAG`, :class:`~attnzoo.nn.TitansMAL`,
:class:`~attnzoo.nn.TitansMAC`): persistent tokens, attention over them plus a causal window, and the gated output.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §3.3 (persistent
memory: ``N_p`` learnable, input-independent tokens prepended to the sequence) and §4.2 (SW-Attn*, the gate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.kernels.merge import merge_parts
from attnzoo.nn.attention import Attention
from attnzoo.nn.checks import positive_int
from attnzoo.nn.layers.base import channels_to_heads, heads_to_channels

MEMORIES = ("titans", "titans_mlp")


def checked_memory(memory: str, allowed: tuple[str, ...] = MEMORIES) -> str:
    """``memory`` if it is one of ``allowed``."""
    if memory not in allowed:
        raise fail("memory", f"one of {list(allowed)}", repr(memory))
    return memory


def persistent_tokens(persistent: int, dim: int) -> nn.Parameter:
    """``persistent`` (an int ≥ 0) learnable tokens ``(N_p, dim)``, started at ``N(0, 0.02²)``."""
    if isinstance(persistent, bool) or not isinstance(persistent, int) or persistent < 0:
        raise fail("persistent", "an int >= 0", repr(persistent))
    return nn.Parameter(0.02 * torch.randn(persistent, dim))


def prepend(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``P ‖ x``: the tokens ``(N_p, dim)`` before every sequence of ``x (B, N, dim)``."""
    return torch.cat([tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


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


class PrefixedWindowAttention(nn.Module):
    """Projections of ``x̃ (B, prefix + N, dim)`` to heads and :func:`prefixed_window_attention` for the last ``N``
    positions; returns ``(B, N, dim)`` channels (no output projection)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, xt: torch.Tensor, prefix: int) -> torch.Tensor:
        q, k, v = (channels_to_heads(t, self.heads) for t in self.qkv(xt).chunk(3, dim=-1))
        return heads_to_channels(prefixed_window_attention(q[:, :, prefix:], k, v, prefix, self.window))


class MemoryGate(nn.Module):
    """``y ⊗ m`` of Titans (§4.2 eq. 28, §4.1 eq. 25): ``W_o (RMSNorm_y(y) ⊙ σ(RMSNorm_m(m)))``, our reading of
    "normalize the outputs y and M(x̃) using learnable vector-valued weights, followed by a non-linearity σ(.)"."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_y, self.norm_m = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


class MemoryAndWindow(nn.Module):
    """The frame of MAG and MAL: ``persistent`` learnable tokens, the memory layer ``M``
    (``az.nn.Attention(method=memory)``, causal, with ``memory_params``) and the window attention's projections
    (``window`` ≥ 1 keys before each query)."""

    def __init__(self, dim: int, heads: int, window: int, persistent: int, memory: str,
                 memory_params: dict[str, Any]) -> None:
        super().__init__()
        self.dim = dim
        self.memory = Attention(dim, heads, method=checked_memory(memory), causal=True, **memory_params)
        self.persistent = persistent_tokens(persistent, dim)
        self.attend = PrefixedWindowAttention(dim, heads, positive_int("window", window))
