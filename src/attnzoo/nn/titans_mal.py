"""``attnzoo.nn.TitansMAL``: Titans' "Memory as a Layer" block — the neural memory, then sliding-window attention.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §4.3 eqs. (29)–(31)
and Figure 4. As implemented, for ``x (B, N, dim)`` and ``N_p`` learnable persistent tokens ``P`` (§3.3)::

    x̃ = P ‖ x                                           (29)
    y = M(x̃)                                             (30)  the memory layer (``az.nn.Attention(method=memory)``:
                                                               Titans' parts around ``titans`` or ``titans_mlp``),
                                                               over the persistent tokens too, as eq. (30) writes
    o = W_o SW-Attn*(y)                                  (31)  queries of x's positions over the first ``N_p`` rows of
                                                               y (always visible) and a causal window of
                                                               ``window + 1`` rows of y (itself included)

Choice: the paper writes ``SW-Attn(y)``; we keep the memory's outputs at the persistent positions visible to every
query (MAG's SW-Attn*), so that they act as the persistent tokens do in MAG (attention sinks, §3.3) at every position
instead of dropping out of the window after ``window`` tokens. With ``persistent=0`` it is the plain causal window.
The attention is exact softmax over both key sets, a log-sum-exp merge (:mod:`attnzoo.nn.titans_common`), then an
output projection ``W_o``. No residuals or norms between the two layers (a model stacks blocks with its own).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.nn.checks import tokens
from attnzoo.nn.titans_common import MemoryAndWindow, prepend


class TitansMAL(MemoryAndWindow):
    """Memory as a Layer: ``x (B, N, dim) → (B, N, dim)``, causal.

    ``window`` (≥ 1): rows of the memory's output each query sees before itself; ``persistent``: learnable tokens
    before the sequence (``N_p``, 0 for none); ``memory``: ``"titans"`` (matrix memory) or ``"titans_mlp"`` (deep
    memory); ``**memory_params``: that method's fixed parameters (``chunk_size``, ``loss``...)."""

    def __init__(self, dim: int, heads: int, window: int = 256, persistent: int = 4, memory: str = "titans",
                 **memory_params: Any) -> None:
        super().__init__(dim, heads, window, persistent, memory, memory_params)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.memory(prepend(self.persistent, tokens("x", x, self.dim)))
        return self.out(self.attend(y, self.persistent.shape[0]))
