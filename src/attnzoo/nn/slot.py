"""``attnzoo.nn.SlotAttention``: the Slot Attention module (Locatello et al., "Object-Centric Learning with Slot
Attention", arXiv:2006.15055, Algorithm 1).

``K`` slots, drawn from a learned Gaussian, compete for ``N`` input features over ``iters`` rounds. Each round (the
attention step is the registered method ``slot``, :mod:`attnzoo.methods.softmax.slot`)::

    q = W_q LayerNorm(slots),   k = W_k LayerNorm(inputs),   v = W_v LayerNorm(inputs)    (no biases)
    updates = slot_attention(q, k, v)       softmax over the slots, ε, weighted mean over the inputs
    slots = GRUCell(updates, slots)
    slots = slots + MLP(LayerNorm(slots))   (dim → hidden_dim, ReLU → dim)

- Initialisation: ``slots = μ + exp(log σ) · n``, ``n ~ N(0, I)`` per slot and example, with learned ``μ`` and
  ``log σ`` of shape ``(1, 1, dim)`` shared by the slots (the paper's "Gaussian with learned mean and variance"),
  both initialised ``U(±√(6 / (1 + dim)))`` as Glorot-uniform gives for that shape in the official code. Pass
  ``generator`` for reproducible draws, or ``slots`` to start from given slots (then nothing is drawn).
- Defaults are the paper's: 3 iterations, ε = 1e-8, MLP hidden size 128, the logit scale ``1/√dim`` (per head:
  ``1/√head_dim``).
- ``mask (B, N)`` bool, False = padding: masked inputs take no part in either normalisation (masked aggregation),
  so padded examples give the slots of their real inputs.
- ``heads`` > 1 splits the slot dimension into heads with their own softmax over slots (a common multi-head variant;
  the paper uses 1). ``input_dim`` is the features' width if it differs from ``dim``.

Returns the slots ``(B, K, dim)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.methods.softmax.slot import EPS
from attnzoo.nn.checks import padding_mask, positive_int, tokens


class SlotAttention(nn.Module):
    """Slot Attention ``inputs (B, N, input_dim) -> slots (B, num_slots, dim)``."""

    def __init__(self, num_slots: int, dim: int, input_dim: int | None = None, iters: int = 3,
                 hidden_dim: int = 128, heads: int = 1, eps: float = EPS, backend: str = "auto") -> None:
        super().__init__()
        self.num_slots, self.dim = positive_int("num_slots", num_slots), positive_int("dim", dim)
        self.input_dim = positive_int("input_dim", dim if input_dim is None else input_dim)
        self.iters, self.heads = positive_int("iters", iters), positive_int("heads", heads)
        positive_int("hidden_dim", hidden_dim)
        if dim % heads:
            raise fail("heads", f"a divisor of dim={dim}", heads)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise fail("eps", "a finite number >= 0", repr(eps))
        self.eps, self.backend = float(eps), backend
        bound = math.sqrt(6 / (1 + dim))
        self.slots_mu = nn.Parameter(torch.empty(1, 1, dim).uniform_(-bound, bound))
        self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, dim).uniform_(-bound, bound))
        self.norm_inputs, self.norm_slots, self.norm_mlp = (nn.LayerNorm(d) for d in (self.input_dim, dim, dim))
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(self.input_dim, dim, bias=False)
        self.to_v = nn.Linear(self.input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def initial_slots(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch × num_slots`` draws from the learned Gaussian ``N(μ, diag(σ²))``."""
        mu = self.slots_mu
        noise = torch.randn(batch, self.num_slots, self.dim, generator=generator, dtype=mu.dtype).to(mu.device)
        return mu + torch.exp(self.slots_log_sigma) * noise

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim) -> (B, heads, S, dim / heads)``."""
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        b, n, _ = tokens("inputs", inputs, self.input_dim).shape
        padding_mask(mask, inputs)
        if slots is None:
            slots = self.initial_slots(b, generator)
        elif not isinstance(slots, torch.Tensor) or tuple(slots.shape) != (b, self.num_slots, self.dim):
            got = f"shape {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise fail("slots", f"a tensor of shape (batch, num_slots, dim) = {(b, self.num_slots, self.dim)}", got)
        x = self.norm_inputs(inputs)
        k, v = self._split(self.to_k(x)), self._split(self.to_v(x))
        attend = None if mask is None else mask.view(b, 1, 1, n)
        for _ in range(self.iters):
            q = self._split(self.to_q(self.norm_slots(slots)))
            updates = attention(q, k, v, method="slot", mask=attend, backend=self.backend, eps=self.eps)
            updates = updates.transpose(1, 2).reshape(b * self.num_slots, self.dim)
            slots = self.gru(updates, slots.reshape(b * self.num_slots, self.dim)).view(b, self.num_slots, self.dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, dim={self.dim}, iters={self.iters}, heads={self.heads}"
