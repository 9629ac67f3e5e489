"""``attnzoo.nn.Aaren``: stacked Aaren modules, attention as an RNN (Feng et al., "Attention as an RNN",
arXiv:2405.13956).

An Aaren module maps ``N`` tokens to ``N`` outputs like a Transformer layer, but its query is a learned token, not one
of the inputs: ``o_1..o_N = Aaren(q, x_1..x_N)`` with ``o_t`` the softmax attention of ``q`` over the keys and values
of ``x_1..x_t``. It trains in parallel (the prefix scan of :mod:`attnzoo.methods.softmax.aaren`) and runs as an RNN
at inference: :meth:`Aaren.step` updates a constant-size state per token, whatever the length so far.

- :class:`AarenAttention`: one module. Per head a learned query ``q_h`` (``heads × head_dim``, initialised
  ``N(0, 1/head_dim)``); keys and values are linear projections of the input, the heads' outputs are merged by an
  output projection, as in multi-head attention. The query reaches the kernel as a stride-0 ``expand`` over
  positions, so every key is scored against the same ``q_h`` (the method's per-position query, made constant).
- :class:`AarenBlock`: the module in a Transformer block — residual and LayerNorm around it and around a two-layer
  GELU MLP (hidden ``mlp_ratio · dim``). The paper stacks Aarens as Transformer layers are stacked (its Figure 4) and
  builds its models by replacing the Transformers of its baselines; the norm placement is our choice: post-norm as in
  the original Transformer by default, ``norm_first=True`` for pre-norm.
- :class:`Aaren`: ``depth`` blocks. Stacked Aarens are stacked RNNs: :meth:`Aaren.prefill` returns one
  :class:`~attnzoo.api.DecodeState` per block, and :meth:`Aaren.step` feeds new tokens through every block, each
  continuing from its state. Prefill then steps equals one forward over the whole sequence.

``key_mask (batch, seq)`` (bool, False = padding) hides padding tokens from every later position (left padding, say).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.api import DecodeState, attention, prefill, step
from attnzoo.errors import fail
from attnzoo.nn.checks import positive_int, tokens

METHOD = "aaren"


class AarenAttention(nn.Module):
    """One Aaren module ``x (B, N, dim) -> (B, N, dim)``: the learned query per head over every prefix of ``x``.

    ``head_dim`` defaults to ``dim // heads``; ``backend`` is passed to :func:`attnzoo.attention`."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, qkv_bias: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = positive_int("dim", dim), positive_int("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise fail("head_dim", f"an int, since dim={dim} is not divisible by heads={heads}", None)
            head_dim = dim // heads
        self.head_dim = positive_int("head_dim", head_dim)
        self.backend = backend
        self.query = nn.Parameter(torch.randn(heads, head_dim) * head_dim**-0.5)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(heads * head_dim, dim)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The learned query expanded over positions, and the keys and values ``(B, H, N, head_dim)`` of ``x``."""
        b, n, _ = tokens("x", x, self.dim).shape
        k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        q = self.query.to(x.dtype).view(1, self.heads, 1, self.head_dim).expand(b, -1, n, -1)
        return q, k, v

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(x)
        out = attention(q, k, v, method=METHOD, causal=True, backend=self.backend, key_mask=key_mask)
        return self._merge(out)

    def prefill(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """The outputs over a prompt ``x`` and the RNN state after it (constant size)."""
        out, state = prefill(*self._heads(x), method=METHOD, key_mask=key_mask)
        return self._merge(out), state

    def step(self, x: torch.Tensor, state: DecodeState,
             key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """The outputs of ``T >= 1`` new tokens ``x (B, T, dim)`` continuing ``state``, and the new state (pass
        ``key_mask (B, T)`` if the prefill had one)."""
        extra = {} if key_mask is None else {"key_mask": key_mask}
        out, state = step(state, *self._heads(x), **extra)
        return self._merge(out), state


class AarenBlock(nn.Module):
    """An Aaren module and an MLP, each with a residual and a LayerNorm (post-norm; ``norm_first`` for pre-norm)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, norm_first: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise fail("mlp_ratio", "a positive number", repr(mlp_ratio))
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise fail("dropout", "a number in [0, 1)", repr(dropout))
        if not isinstance(norm_first, bool):
            raise fail("norm_first", "a bool", repr(norm_first))
        self.attn = AarenAttention(dim, heads, head_dim, backend=backend)
        hidden = max(1, round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _around(self, x: torch.Tensor, mixed: Any) -> tuple[torch.Tensor, Any]:
        """The block's output given ``mixed(h) -> (attention output, extra)`` applied to the attention's input."""
        if self.norm_first:
            a, extra = mixed(self.norm1(x))
            x = x + self.dropout(a)
            return x + self.mlp(self.norm2(x)), extra
        a, extra = mixed(x)
        x = self.norm1(x + self.dropout(a))
        return self.norm2(x + self.mlp(x)), extra

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._around(x, lambda h: (self.attn(h, key_mask), None))[0]

    def prefill(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        return self._around(x, lambda h: self.attn.prefill(h, key_mask))

    def step(self, x: torch.Tensor, state: DecodeState,
             key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        return self._around(x, lambda h: self.attn.step(h, state, key_mask))


class Aaren(nn.Module):
    """``depth`` stacked :class:`AarenBlock` s, ``x (B, N, dim) -> (B, N, dim)``; causal by construction (output
    ``t`` reads tokens ``1..t``). :meth:`prefill` / :meth:`step` run it as a stacked RNN."""

    def __init__(self, dim: int, heads: int, depth: int = 1, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, norm_first: bool = False, backend: str = "auto") -> None:
        super().__init__()
        positive_int("depth", depth)
        self.blocks = nn.ModuleList(
            AarenBlock(dim, heads, head_dim, mlp_ratio, dropout, norm_first, backend) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_mask)
        return x

    def prefill(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[DecodeState]]:
        """The outputs over a prompt and one constant-size state per block."""
        states = []
        for block in self.blocks:
            x, state = block.prefill(x, key_mask)
            states.append(state)
        return x, states

    def step(self, x: torch.Tensor, states: list[DecodeState],
             key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[DecodeState]]:
        """The outputs of new tokens ``x (B, T, dim)`` after the sequence ``states`` hold, and the new states."""
        if not isinstance(states, list) or len(states) != len(self.blocks):
            raise fail("states", f"a list of {len(self.blocks)} DecodeStates (from prefill or step)",
                       type(states).__name__ if not isinstance(states, list) else f"{len(states)} states")
        new = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.step(x, state, key_mask)
            new.append(state)
        return x, new
