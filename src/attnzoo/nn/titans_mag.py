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
start as ``N(0, 0.02²)``. The pieces shared with MAL and MAC are in :mod:`attnzoo.nn.titans_common`. Not here:
decoding (a ring of window keys plus the memory state would do it).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.nn.checks import tokens
from attnzoo.nn.titans_common import MemoryAndWindow, MemoryGate, prepend


class TitansMAG(MemoryAndWindow):
    """Memory as a Gate: ``x (B, N, dim) → (B, N, dim)``, causal.

    ``window`` (≥ 1): keys each query sees before itself in the attention branch; ``persistent``: learnable tokens
    before the sequence (``N_p``, 0 for none); ``memory``: ``"titans"`` (matrix memory) or ``"titans_mlp"`` (deep
    memory); ``**memory_params``: that method's fixed parameters (``chunk_size``, ``loss``...)."""

    def __init__(self, dim: int, heads: int, window: int = 256, persistent: int = 4, memory: str = "titans",
                 **memory_params: Any) -> None:
        super().__init__(dim, heads, window, persistent, memory, memory_params)
        self.gate = MemoryGate(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = prepend(self.persistent, tokens("x", x, self.dim))
        prefix = self.persistent.shape[0]
        return self.gate(self.attend(xt, prefix), self.memory(xt)[:, prefix:])
