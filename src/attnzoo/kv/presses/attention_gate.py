"""K7 — Attention-Gate: a small trainable attention module emits a keep/evict flag for every token.

Paper: "In-context KV-Cache Eviction for LLMs via Attention-Gate" (Zeng et al., arXiv:2410.12876). An Attention-Gate
(AG) sits before each attention layer; it attends over the context (so the decision is in-context, not a fixed
heuristic) and yields, per token and per head, an eviction flag. The layer then caches only the tokens flagged to
keep. The gates are tuned on top of a frozen model with an added sparsity term: the mean keep probability, which
pushes the gates to evict.

As implemented here:

- :class:`AttentionGate` (an ``nn.Module`` in this file) holds, per kv head ``h``, a one-head attention of width
  ``dim`` over the context's keys ``x`` (the AG of the paper reads the layer's input hidden states, which a KV-cache
  press does not see; the keys are the per-token representation it has):
  ``z_i = w_o · Σ_j softmax_j((x_i W_q)(x_j W_k)ᵀ / √dim) (x_j W_v) + b`` over the tokens ``j <= i`` (causal), and
  ``σ(z_i)`` is token ``i``'s keep probability. ``b`` starts at 2 (an untrained gate keeps everything).
- :class:`AttentionGatePress` keeps the tokens with ``σ(z) >= threshold`` (the paper's flags; threshold 0.5); with a
  ``compression_ratio`` or ``budget`` it keeps the top tokens by ``σ(z)`` instead, so the ratio is honoured exactly.
  After each decoding step the new token is flagged the same way (its gate attends over the cache) and dropped from
  the cache if flagged to evict (it has already been attended by its own query); the ratio applies to the prompt.
- :func:`train_attention_gate` fits a gate on ``(q, k, v)`` batches: the gated attention adds ``log σ(z_j)`` to the
  score of every earlier key ``j`` (a soft eviction, differentiable; each query still sees its own token), and the loss
  is the gated output's squared error relative to full causal attention plus ``sparsity · mean σ(z)`` (the paper's
  eviction regulariser). The paper trains through the language-model loss; output fidelity is the stand-in here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnzoo.errors import fail
from attnzoo.kernels.cache import LRUCache
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, ScorerPress, kept_tokens, register_press, top_slots

DEFAULT_THRESHOLD = 0.5


class AttentionGate(nn.Module):
    """Per kv head, a one-head causal attention of width ``dim`` over the keys giving each token a keep logit."""

    def __init__(self, kv_heads: int, head_dim: int, dim: int = 16, bias: float = 2.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(name, "a positive int", repr(value))
        self.kv_heads, self.head_dim, self.dim = kv_heads, head_dim, dim

        def init(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, dtype=dtype) / math.sqrt(fan_in))

        self.w_q = init(kv_heads, head_dim, dim, fan_in=head_dim)
        self.w_k = init(kv_heads, head_dim, dim, fan_in=head_dim)
        self.w_v = init(kv_heads, head_dim, dim, fan_in=head_dim)
        self.w_o = init(kv_heads, dim, fan_in=dim)
        self.bias = nn.Parameter(torch.full((kv_heads,), float(bias), dtype=dtype))

    def forward(self, keys: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Keep logits ``(B, Hkv, R)`` of the slots ``rows (B, Hkv, R)`` (default all) of a cache's ``keys (B, Hkv,
        L, D)`` at ``positions (B, Hkv, L)`` (``-1``: empty); each attends over the slots at or before it."""
        if keys.dim() != 4 or keys.shape[1] != self.kv_heads or keys.shape[3] != self.head_dim:
            shape = (keys.shape[1], keys.shape[-1])
            raise fail("gate", f"a gate for the cache's (kv_heads, head_dim) {shape}",
                       f"a gate for ({self.kv_heads}, {self.head_dim})")
        x = keys.to(self.w_q.dtype)
        q_pos = positions if rows is None else positions.gather(2, rows)
        x_q = x if rows is None else x.gather(2, rows.unsqueeze(-1).expand(*rows.shape, x.shape[-1]))
        q = torch.einsum("bhld,hde->bhle", x_q, self.w_q)
        k = torch.einsum("bhld,hde->bhle", x, self.w_k)
        v = torch.einsum("bhld,hde->bhle", x, self.w_v)
        k_pos = positions.unsqueeze(2)
        seen = (k_pos >= 0) & (k_pos <= q_pos.unsqueeze(-1))
        a = safe_softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), seen)
        return torch.einsum("bhre,he->bhr", a @ v, self.w_o) + self.bias.view(1, -1, 1)


@dataclass(frozen=True, eq=False)
class AttentionGatePress(ScorerPress):
    """Evict the tokens a trained :class:`AttentionGate` flags (``σ(z) < threshold``; ``flags=True``, the paper's rule,
    also at each decoding step), or keep its top tokens when ``compression_ratio`` / ``budget`` is given (with
    ``flags=False`` a ratio of 0 keeps every token)."""

    gate: AttentionGate | None = None
    threshold: float = DEFAULT_THRESHOLD
    flags: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.gate, AttentionGate):
            raise fail("gate", "an AttentionGate (attnzoo.kv.presses.attention_gate)", type(self.gate).__name__)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise fail("threshold", "a keep probability in (0, 1)", repr(t))

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        assert self.gate is not None
        with torch.no_grad():
            return torch.sigmoid(self.gate(cache.keys, cache.positions)).masked_fill(~cache.occupied(), 0.0)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """Keep the gate's top ``fraction`` of the tokens (``flags=False``: no eviction by threshold, so 100 % keeps
        everything). Without a ``gate=``, one is trained on ``calibration=[(q, k, v), ...]`` (every layer's data, one
        gate shared by the layers; :data:`CALIBRATION_STEPS` steps of :func:`train_attention_gate`; the gate trained
        on a calibration list is reused for that same list at other budgets)."""
        calibration = options.pop("calibration", None)
        if options.get("gate") is None:
            if not calibration:
                raise fail("calibration", "(q, k, v) batches to train a gate on (or pass gate=)", calibration)
            options["gate"] = _gate_for(calibration)
        return cls(compression_ratio=1.0 - fraction, flags=False, **options)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        scores = self.score(cache, context)
        if self.flags and self.compression_ratio == 0 and self.budget is None:
            keep = cache.occupied() & (scores >= self.threshold)
            return cache.keep(top_slots(keep.float(), cache, keep.sum(-1)))
        return cache.keep(top_slots(scores, cache, kept_tokens(cache, self.compression_ratio, self.budget)))

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        assert self.gate is not None
        if not self.flags:
            return cache
        newest = cache.positions.long().argmax(-1, keepdim=True)  # the step's token
        with torch.no_grad():
            flag = torch.sigmoid(self.gate(cache.keys, cache.positions, newest))
        evict = torch.zeros_like(cache.occupied()).scatter(2, newest, flag < self.threshold)
        if not bool(evict.any()):
            return cache
        keep = cache.occupied() & ~evict
        return cache.keep(top_slots(keep.float(), cache, keep.sum(-1)))


CALIBRATION_STEPS = 50
_TRAINED: LRUCache[tuple[object, AttentionGate]] = LRUCache(4)


def _gate_for(calibration: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> AttentionGate:
    """A gate trained on ``calibration`` (the same list object gets the same gate back)."""
    def train() -> tuple[object, AttentionGate]:
        _, k, _ = calibration[0]
        gate = AttentionGate(kv_heads=k.shape[1], head_dim=k.shape[-1], dtype=k.dtype)
        train_attention_gate(gate, calibration, steps=CALIBRATION_STEPS)
        return calibration, gate

    held, gate = _TRAINED.get(id(calibration), train)
    if held is not calibration:  # another list that took a freed list's id
        _TRAINED.clear()
        held, gate = _TRAINED.get(id(calibration), train)
    return gate


def train_attention_gate(
    gate: AttentionGate, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, steps: int = 100,
    lr: float = 1e-2, sparsity: float = 0.05, scale: float | None = None,
) -> list[float]:
    """Fit ``gate`` in place on ``batches`` of ``(q (B, H, S, D), k (B, Hkv, S, D), v)`` (cycled for ``steps`` Adam
    steps at rate ``lr``) and return the losses: relative squared error of the softly gated causal attention against
    the full one, plus ``sparsity · mean σ(z)`` (see the module)."""
    data = list(batches)
    if not data:
        raise fail("batches", "at least one (q, k, v) batch", "none")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or sparsity < 0:
        raise fail("sparsity", "a non-negative weight", repr(sparsity))
    optimiser = torch.optim.Adam(gate.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        q, k, v = (t.to(gate.w_q.dtype) for t in data[i % len(data)])
        b, h, s, d = q.shape
        hkv = k.shape[1]
        positions = torch.arange(s).expand(b, hkv, s)
        keep_logit = nn.functional.logsigmoid(gate(k, positions))  # (B, Hkv, S)
        sc = d**-0.5 if scale is None else scale
        logits = (q @ k.repeat_interleave(h // hkv, 1).transpose(-1, -2)) * sc
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        earlier = ~torch.eye(s, dtype=torch.bool)
        soft = keep_logit.repeat_interleave(h // hkv, 1).unsqueeze(2) * earlier  # the query's own token is kept
        v_h = v.repeat_interleave(h // hkv, 1)
        full = safe_softmax(logits, causal) @ v_h
        gated = safe_softmax(logits + soft, causal) @ v_h
        loss = (gated - full).pow(2).sum() / full.pow(2).sum() + sparsity * keep_logit.exp().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses


register_press(AttentionGatePress, "K7", "In-context KV-Cache Eviction for LLMs via Attention-Gate", "2410.12876",
               "a trainable attention gate over the context emits per-token keep/evict flags", ("training",))
