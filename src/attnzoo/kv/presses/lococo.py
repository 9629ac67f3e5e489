"""K8 — LoCoCo: a fixed-size cache whose slots a learnable 1-D convolution fuses with the incoming tokens.

Paper: "LoCoCo: Dropping In Convolutions for Long Context Compression" (Cai et al., arXiv:2406.05317). The cache has
``M`` slots. When a segment of ``T`` tokens arrives, the ``M + T`` candidates (old slots, then new tokens) are blended
into ``M`` slots: each slot is a convex combination of candidates whose mixing weights a 1-D convolution computes from
the data, so information of the tokens that do not fit is fused in instead of dropped.

As implemented here, for one ``(sequence, kv head)`` row with candidates ``x_0 .. x_{L-1}`` in position order
(``L = M + T``; empty candidates first) and ``a_j`` the attention mass the segment's queries put on candidate ``j``
(causal softmax over the candidates, averaged over the segment's queries and the kv head's query heads):

    z[m, j] = w[j − (m + T) + K − 1] + γ · log a_j      for  m + T − K < j <= m + T   (−∞ elsewhere)
    W[m] = softmax_j z[m, :],    key_m = Σ_j W[m, j] k_j,   value_m = Σ_j W[m, j] v_j

i.e. slot ``m`` is a ``K``-tap convolution over the candidate sequence, aligned with candidate ``m + T`` (the one it
would hold if the cache kept the most recent tokens) and reaching ``K − 1`` candidates back, its taps ``w`` (per kv
head) modulated by the data-dependent term ``γ · log a_j``. A slot's position is its largest-weight candidate's;
a slot whose window holds only empty candidates stays empty. The paper feeds the segment's attention scores to its
convolution (its kernel's input channels are the segment's queries); attnzoo decodes one token per step and compresses
prompts of any length, so the segment's scores are pooled into ``a_j`` — the choice made here.

Defaults: ``kernel = [0.]`` (one tap) and ``γ = 0`` make ``W`` the identity on the last ``M`` candidates: the cache
keeps the most recent ``M`` tokens (a sliding window), the starting point of :func:`fit_lococo`. The prompt is fused
in segments of ``chunk`` tokens (default ``M``), then every decoding step fuses its one token (``T = 1``), so the cache
always has exactly ``M`` slots. Fused slots carry no log-weight and no per-slot press data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, check_positive, register_press


@dataclass(frozen=True, eq=False)
class LoCoCoPress(Press):
    """A cache of ``size`` slots fused by convolution taps ``kernel`` (``(K,)`` or ``(Hkv, K)``; default ``[0.]``,
    keep the most recent) and data weight ``gamma`` (a float or ``(Hkv,)``; default 0). ``chunk``: the prompt's
    segment length (default ``size``)."""

    size: int
    kernel: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    gamma: float | torch.Tensor = 0.0
    chunk: int | None = None

    def __post_init__(self) -> None:
        check_positive("size", self.size)
        if self.chunk is not None:
            check_positive("chunk", self.chunk)
        w = self.kernel
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() not in (1, 2) or w.shape[-1] < 1:
            raise fail("kernel", "a float tensor of taps, (K,) or (kv_heads, K)",
                       tuple(w.shape) if isinstance(w, torch.Tensor) else repr(w))
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (float, int, torch.Tensor)) or (
                isinstance(g, torch.Tensor) and g.dim() > 1):
            raise fail("gamma", "a float or a (kv_heads,) tensor", repr(g))

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """``size = round(fraction · tokens)`` slots for prompts of ``tokens`` tokens (an option; else the length of
        the ``calibration=[(q, k, v), ...]`` prompts)."""
        calibration = options.pop("calibration", None)
        tokens = options.pop("tokens", None if not calibration else calibration[0][1].shape[2])
        check_positive("tokens", tokens)
        return cls(size=max(1, round(fraction * tokens)), **options)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        kernel, gamma = self._per_head(cache)
        order = _position_order(cache)
        tokens = cache.keep(order)  # the prompt's slots, oldest first, empty ones last
        queries = _query_rows(tokens, context.queries)
        b, hkv = cache.positions.shape[:2]
        state = KVCache.empty(b, hkv, cache.keys.shape[-1], cache.values.shape[-1], self.size, cache.keys.dtype,
                              cache.keys.device)
        chunk = self.chunk or self.size
        for start in range(0, tokens.slots, chunk):
            part = slice(start, start + chunk)
            positions = tokens.positions[:, :, part]
            candidates = _concat(state, tokens.keys[:, :, part], tokens.values[:, :, part], positions)
            state = fuse(candidates, queries[:, :, part], positions, context.scale, kernel, gamma, self.size)
        return replace(state, length=cache.length, extras=cache.extras)

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        kernel, gamma = self._per_head(cache)
        q_pos = cache.query_positions(context.queries.shape[2])[:, 0, :, 0].unsqueeze(1)  # (B, 1, T)
        return fuse(cache, context.queries, q_pos.expand(-1, cache.keys.shape[1], -1), context.scale, kernel, gamma,
                    self.size)

    def _per_head(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        hkv = cache.keys.shape[1]
        kernel = self.kernel if self.kernel.dim() == 2 else self.kernel.expand(hkv, -1)
        if kernel.shape[0] != hkv:
            raise fail("kernel", f"taps for the cache's {hkv} kv heads", tuple(self.kernel.shape))
        gamma = torch.as_tensor(self.gamma, dtype=kernel.dtype, device=kernel.device).expand(hkv)
        return kernel.to(cache.keys.device), gamma.to(cache.keys.device)


def fuse(
    cache: KVCache, queries: torch.Tensor, query_positions: torch.Tensor, scale: float, kernel: torch.Tensor,
    gamma: torch.Tensor, size: int,
) -> KVCache:
    """The ``size``-slot cache fusing all slots of ``cache`` (the candidates) as in the module's formula.

    ``queries (B, H, T', D)`` at ``query_positions (B, Hkv, T')`` (``-1``: padding) are the segment's queries that
    weigh the candidates.
    """
    b, hkv, n = cache.positions.shape
    cache = cache.keep(_position_order(cache, empty_first=True))
    taps = kernel.shape[-1]
    m = torch.arange(size, device=kernel.device).view(size, 1)
    j = m + (n - size) - (taps - 1) + torch.arange(taps, device=kernel.device)  # (size, taps): slot m's candidates
    valid = j >= 0
    window = j.clamp(min=0).flatten().expand(b, hkv, -1)  # (B, Hkv, size·taps)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, window).view(b, hkv, size, taps)

    mass = _attention_mass(cache, queries, query_positions, scale)  # (B, Hkv, n)
    z = kernel.view(1, hkv, 1, taps) + gamma.view(1, hkv, 1, 1) * take(mass.clamp(min=1e-30).log())
    seen = valid & take(cache.occupied())
    w = safe_softmax(z, seen)  # (B, Hkv, size, taps)

    def mix(t: torch.Tensor) -> torch.Tensor:
        rows = t.gather(2, window.unsqueeze(-1).expand(b, hkv, size * taps, t.shape[-1]))
        return (w.unsqueeze(-1).to(t.dtype) * rows.view(b, hkv, size, taps, -1)).sum(3)

    keys, values = mix(cache.keys), mix(cache.values)
    positions = torch.where(seen.any(-1), take(cache.positions).gather(3, w.argmax(-1, keepdim=True)).squeeze(3), -1)
    return replace(cache, keys=keys, values=values, positions=positions, log_weight=None, slot_data={})


def fit_lococo(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int, *, taps: int = 4, probe: int = 8, steps: int = 50,
    lr: float = 0.05, chunk: int | None = None, scale: float | None = None,
) -> LoCoCoPress:
    """A :class:`LoCoCoPress` of ``size`` slots whose ``taps``-tap kernel and ``γ`` (per kv head) are fitted by Adam
    (``steps`` at rate ``lr``) so that the last ``probe`` queries of ``q (B, H, S, D)``, attending over the fused cache
    of the first ``S − probe`` tokens plus their own, match full causal attention (mean squared error). The kernel
    starts at the most-recent-tokens rule (newest tap 0, the others −3)."""
    check_positive("size", size)
    check_positive("taps", taps)
    s = k.shape[2]
    if isinstance(probe, bool) or not isinstance(probe, int) or not 0 < probe < s:
        raise fail("probe", f"an int in [1, {s}) (queries held out of the fused prompt)", repr(probe))
    hkv = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel = torch.full((hkv, taps), -3.0, dtype=k.dtype)
    kernel[:, -1] = 0.0
    kernel.requires_grad_(True)
    gamma = torch.zeros(hkv, dtype=k.dtype, requires_grad=True)
    cut = s - probe
    full = KVCache.from_prompt(k, v)
    target = softmax_attention(full, q[:, :, cut:], scale).detach()
    optimiser = torch.optim.Adam([kernel, gamma], lr=lr)
    prompt = KVCache.from_prompt(k[:, :, :cut], v[:, :, :cut])
    context = PressContext(q[:, :, :cut], scale, "softmax")
    for _ in range(steps):
        press = LoCoCoPress(size, kernel, gamma, chunk)
        fused = press.compress(prompt, context).append(k[:, :, cut:], v[:, :, cut:])
        loss = (softmax_attention(fused, q[:, :, cut:], scale) - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return LoCoCoPress(size, kernel.detach(), gamma.detach(), chunk)


def _attention_mass(
    cache: KVCache, queries: torch.Tensor, query_positions: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``(B, Hkv, L)``: causal softmax weight of the queries over the slots, averaged over queries and group heads
    (queries at position ``-1`` are padding)."""
    b, h = queries.shape[:2]
    hkv = cache.keys.shape[1]
    q_pos = query_positions.repeat_interleave(h // hkv, dim=1).unsqueeze(-1)  # (B, H, T', 1)
    k_pos = cache.key_positions(h)
    seen = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos >= 0)
    p = safe_softmax(cache.scores(queries, scale).float(), seen)
    real = (q_pos >= 0).sum(2).clamp(min=1)  # (B, H, 1)
    return (p.sum(2) / real).view(b, hkv, h // hkv, -1).mean(2)


def _position_order(cache: KVCache, empty_first: bool = False) -> torch.Tensor:
    """``(B, Hkv, L)`` slot indices sorting each row by position (empty slots last, or first)."""
    pos = cache.positions.long()
    empty = torch.iinfo(torch.long).min if empty_first else torch.iinfo(torch.long).max
    return torch.sort(torch.where(pos >= 0, pos, empty), dim=-1, stable=True).indices


def _query_rows(tokens: KVCache, queries: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)``: the query of each prompt slot (kv head ``h``'s slot at position ``p`` gives its query heads row
    ``p``: the prefill's rows are the positions); empty slots take row 0 (their weights are masked)."""
    b, h, s, d = queries.shape
    row = tokens.positions.long().clamp(0, s - 1).repeat_interleave(h // tokens.keys.shape[1], dim=1)
    return queries.gather(2, row.unsqueeze(-1).expand(b, h, row.shape[-1], d))


def _concat(state: KVCache, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVCache:
    return replace(state, keys=torch.cat([state.keys, k], 2), values=torch.cat([state.values, v], 2),
                   positions=torch.cat([state.positions, positions], 2), storage=None)



register_press(LoCoCoPress, "K8", "LoCoCo: Dropping In Convolutions for Long Context Compression", "2406.05317",
               "a fixed-size cache; a learnable 1-D convolution fuses old slots with incoming tokens",
               ("queries", "training"))
