"""``attnzoo.nn.TitansMAC``: Titans' "Memory as a Context" block — segments attend to what the long-term memory
retrieves for them, then teach it their attention outputs.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §4.1 eqs. (21)–(25)
and Figures 2 and 3a. As implemented, for ``x (B, N, dim)`` cut into segments ``S⁽ᵗ⁾`` of ``segment`` (C) tokens (the
last may be shorter), ``N_p`` learnable persistent tokens ``P`` (§3.3) and the memory ``M`` of ``method="titans"``
(a matrix per head, its state carried from segment to segment; ``M₀ = 0``)::

    h_t = M*_{t−1}(W_Q S⁽ᵗ⁾)                   (21)  retrieval, no update (h_1 = 0: the memory starts empty)
    S̃⁽ᵗ⁾ = P ‖ h_t ‖ S⁽ᵗ⁾                      (22)
    y_t = Attn(S̃⁽ᵗ⁾)                           (23)  queries of S⁽ᵗ⁾'s positions; softmax over the N_p persistent
                                                     tokens (always visible), the h_t rows j ≤ i and the S⁽ᵗ⁾ tokens
                                                     j ≤ i (itself included)
    M_t = M_{t−1} trained on (W_K y_t, W_V y_t)  (24)  titans' rule, gates η, θ, α = σ(W_g y_t) per head and token
    o_t = W_o (RMSNorm(y_t) ⊙ σ(RMSNorm(m_t)))   (25)  m_t = M*_t(W_Q y_t): row i reads the memory after row i's update

Choices:

- **Causality.** Figure 3a's mask shows the memory tokens ``h_t`` visible to the whole segment, but ``h_t``'s row j is
  the retrieval with token j's own query, so a query ``i < j`` seeing it would read token ``j``. We keep the block
  causal: ``h_t``'s rows are masked like the segment's tokens (row j visible to queries ``i ≥ j``), and in eq. (25)
  row i of ``M*_t(y_t)`` reads the memory after the update with ``y_t``'s rows up to i (titans' own causal retrieval),
  not after the whole segment.
- **One mini-batch per segment.** The memory's ``chunk_size`` is the segment: every gradient of segment t is taken at
  ``M_{t−1}`` (Titans §3.2's mini-batch gradient descent), with momentum, forgetting and retrieval per token.
- **The memory runs through the decoding API** of ``titans`` (:func:`attnzoo.prefill` on the first segment's update,
  then :func:`attnzoo.step` with the state carried across segments). The retrieval of eq. (21) is a step with zero
  gates (η = θ = α = 0 leave ``M`` as it is, so the step reads ``M_{t−1}``) whose state is dropped.
- The memory has its own projections ``W_Q``, ``W_K``, ``W_V`` (no bias) and gate projection (titans' layer's
  starts: η 0.9, θ 0.1, α 0.01); queries and keys are ℓ2-normalised (``qk_l2norm``), no query scale. Titans §4.4's
  short convolutions are not applied (the segment loop would have to carry each convolution's last tokens). ``h_t``
  enters the attention as tokens in model space (the memory's values, ``dim`` channels). ``⊗`` is MAG's gate
  (:class:`~attnzoo.nn.titans_common.MemoryGate`).
- Attention: one ``scaled_dot_product_attention`` per segment with a boolean mask of ``C × (N_p + 2C)``, so
  O(N·(N_p + C)) time; the memory is linear in N. Linear memory only (``memory="titans"``; the deep memory's learned
  ``M₀`` is not wired here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.api import prefill, step
from attnzoo.errors import fail
from attnzoo.nn.checks import positive_int, tokens
from attnzoo.nn.layers.base import channels_to_heads, heads_to_channels
from attnzoo.nn.layers.titans import GATE_STARTS, gate_projection, token_gates
from attnzoo.nn.titans_common import MemoryGate, checked_memory, persistent_tokens, prepend
from attnzoo.registry import get

MEMORY_PARAMS = ("loss", "delta", "p", "qk_l2norm")  # titans' parameters a MAC block passes through


def memory_params_of(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` validated as titans' fixed parameters; the gates and the chunk are the block's."""
    known = {p.name: p for p in get("titans").spec.params}
    for name, value in params.items():
        if name not in MEMORY_PARAMS:
            raise fail(name, f"no value (TitansMAC passes only {list(MEMORY_PARAMS)} to its memory)", repr(value))
    return {name: known[name].validate(value) for name, value in params.items()}


def segment_mask(prefix: int, c: int, device: torch.device) -> torch.Tensor:
    """``(c, prefix + 2c)`` bool, True = visible: all ``prefix`` persistent keys, then memory rows and segment tokens
    ``j ≤ i``."""
    causal = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(c, prefix, dtype=torch.bool, device=device), causal, causal], dim=1)


class TitansMAC(nn.Module):
    """Memory as a Context: ``x (B, N, dim) → (B, N, dim)``, causal.

    ``segment`` (≥ 1): tokens per segment (C); ``persistent``: learnable tokens before each segment (``N_p``, 0 for
    none); ``memory``: ``"titans"`` (the matrix memory); ``**memory_params``: titans' ``loss``, ``delta``, ``p``,
    ``qk_l2norm``."""

    def __init__(self, dim: int, heads: int, segment: int = 64, persistent: int = 4, memory: str = "titans",
                 **memory_params: Any) -> None:
        super().__init__()
        checked_memory(memory, ("titans",))
        self.dim, self.heads, self.segment = dim, heads, positive_int("segment", segment)
        if dim % heads:
            raise fail("heads", f"a divisor of dim={dim}", repr(heads))
        self.memory_params = memory_params_of(memory_params)
        self.persistent = persistent_tokens(persistent, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # the attention's
        self.memory_q = nn.Linear(dim, dim, bias=False)
        self.memory_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.memory_gates = gate_projection(dim, heads, list(GATE_STARTS.values()))
        self.gate = MemoryGate(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens("x", x, self.dim)
        prefix, state, outs = self.persistent.shape[0], None, []
        for s in x.split(self.segment, dim=1):
            q = channels_to_heads(self.memory_q(s), self.heads)
            h = torch.zeros_like(s) if state is None else heads_to_channels(self.retrieve(state, q))
            y = self.attend(prepend(self.persistent, torch.cat([h, s], dim=1)), prefix)
            m, state = self.memorise(state, y)
            outs.append(self.gate(y, heads_to_channels(m)))
        return torch.cat(outs, dim=1)

    def retrieve(self, state: Any, q: torch.Tensor) -> torch.Tensor:
        """``M*(q)`` of the memory in ``state``, which stays as it is (a step with zero gates; its state dropped)."""
        zero = torch.zeros(q.shape[:3], dtype=q.dtype, device=q.device)
        return step(state, q, q, torch.zeros_like(q), eta=zero, theta=zero, alpha=zero)[0]

    def attend(self, context: torch.Tensor, prefix: int) -> torch.Tensor:
        """Eq. (23): ``context = P ‖ h ‖ S (B, prefix + 2c, dim)``; the outputs of S's ``c`` positions."""
        q, k, v = (channels_to_heads(t, self.heads) for t in self.qkv(context).chunk(3, dim=-1))
        c = (context.shape[1] - prefix) // 2
        mask = segment_mask(prefix, c, context.device)
        return heads_to_channels(F.scaled_dot_product_attention(q[:, :, -c:], k, v, attn_mask=mask))

    def memorise(self, state: Any, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Eqs. (24)–(25): the memory trained on ``y (B, c, dim)``'s rows in turn, each read with its query after its
        own update; returns ``(M*(W_Q y) (B, H, c, D), state)``."""
        q = channels_to_heads(self.memory_q(y), self.heads)
        k, v = (channels_to_heads(t, self.heads) for t in self.memory_kv(y).chunk(2, dim=-1))
        gates = token_gates(self.memory_gates, y, tuple(GATE_STARTS), self.heads)
        if state is None:
            return prefill(q, k, v, method="titans", scale=1.0, chunk_size=self.segment, **gates, **self.memory_params)
        return step(state, q, k, v, **gates)
