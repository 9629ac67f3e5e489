"""Memories learned at test time by chunked gradient descent with momentum and decay (Titans): a linear (matrix)
memory (:func:`chunked`, :func:`step`) and a two-layer MLP memory (:func:`chunked_mlp`).

Per head, the memory ``M (Dk, Dv)`` maps a key to a value (``M(k) = Mᵀk``; the transpose of the papers' ``(Dv, Dk)``
writing), its momentum ``S`` has the same shape, and the sequence is cut into chunks of ``C`` tokens from its first
token. For token ``t`` of a chunk whose first token sees the memory ``M₀`` (the memory after the previous chunk)::

    e_t = M₀ᵀ k_t − v_t                      the error, against the memory at the chunk start
    u_t = k_t φ(e_t)ᵀ                        the gradient of the inner loss at M₀ (φ: see :func:`loss_gradient`)
    S_t = η_t S_{t−1} − θ_t u_t              momentum ("surprise")
    M_t = (1 − α_t) M_{t−1} + S_t            forgetting
    o_t = M_tᵀ q_t                           retrieval, after the token's own update

With ``C = 1`` every gradient is taken at the current memory: the exact token-by-token recurrence.

Chunked form. Inside a chunk (positions ``1..C``), with ``a_t = 1 − α_t``, the decay products
``R^a_tj = Π_{j<m≤t} a_m`` and ``R^η_tj = Π_{j<m≤t} η_m`` (``j ≤ t``; 0 above the diagonal), ``A_t = Π_{m≤t} a_m``
and ``E_t = Π_{m≤t} η_m``, unrolling both recurrences from the chunk's start state ``(M₀, S₀)`` gives::

    S_t = E_t S₀ − Σ_{i≤t} θ_i R^η_ti u_i
    M_t = A_t M₀ + f_t S₀ − Σ_{i≤t} θ_i G_ti u_i,       f = R^a E,   G = R^a R^η

so, with ``Φ`` the chunk's rows ``θ_i φ(e_i)ᵀ`` (``C × Dv``)::

    O   = diag(A) Q M₀ + diag(f) Q S₀ − (Q Kᵀ ⊙ G) Φ
    M_C = A_C M₀ + f_C S₀ − (diag(G_C·) K)ᵀ Φ,          S_C = E_C S₀ − (diag(R^η_C·) K)ᵀ Φ

The decay products are cumulative products of masked ``C × C`` matrices (never ratios of cumulative products, so a
gate of exactly 0 — ``η = 0``, ``α = 1`` — is exact, and nothing overflows). Everything that does not depend on the
memory (``G``, ``f``, ``Q Kᵀ ⊙ G``, the chunk-end weights) is computed as batched matmuls over a group of chunks
(:data:`GROUP_BUDGET` bounds each ``C × C`` temporary; queries and keys are normalised per group, so no sequence-wide
temporary is made); the errors depend on ``M₀`` through ``φ`` (nonlinear for Huber and ℓp), so a loop over the chunks
runs one ``C × Dk`` by ``Dk × Dv`` product for the errors and one ``2Dk × C`` by ``C × Dv`` product for the new
``[M; S]``; a group's outputs are one batched matmul against its stacked chunk-start states. O(N·C·(C + D) + N·D²)
time; without autograd the output is written group by group in place (O(N·Dv) beyond the inputs); with autograd the
saved chunk states add O(N·D²/C). Plain autograd (differentiable in q, k, v and every gate).

Continuing a sequence: the state (:class:`MemoryState`) holds ``M``, ``S``, the memory at the start of the current
chunk and the position in it. A call that starts mid-chunk is padded at the front with that many tokens
(``k = v = 0``, ``η = 1``, ``θ = 0``, ``α = 0``), which leave ``S`` and the decay products unchanged and are kept out of
the sum ``f`` (so they add nothing to ``M``), and its first chunk takes its errors against the stored chunk-start
memory; the end is padded up to a whole chunk, and the last chunk's end state is read at its last real token's row
(``M_r``, ``S_r`` instead of ``M_C``, ``S_C``). fp16/bf16 inputs are computed in fp32. Heads must already match
(callers repeat K/V heads: each query head has its own gates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.linear_scan import FeatureMaps, accumulation_dtype

LOSSES = ("l2", "huber", "lp", "huber_switch")
GROUP_BUDGET = 1 << 16  # elements of each C×C coefficient tensor of a group of chunks (256 KiB in fp32)


@dataclass(frozen=True)
class MemoryState:
    """Where a memory stands between calls: ``memory`` ``M`` and ``momentum`` ``S`` ``(B, H, Dk, Dv)``,
    ``chunk_start`` the memory the current chunk's gradients are taken at, ``position`` the tokens of the current
    chunk already seen (0: the next token starts a chunk, and ``chunk_start`` is ``memory``)."""

    memory: torch.Tensor
    momentum: torch.Tensor
    chunk_start: torch.Tensor
    position: int

    @property
    def nbytes(self) -> int:
        """The bytes the state holds (three ``Dk × Dv`` matrices per head, whatever the length decoded)."""
        return sum(t.numel() * t.element_size() for t in (self.memory, self.momentum, self.chunk_start))


def empty_state(batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> MemoryState:
    """The state before the first token: zero memory and momentum."""
    zero = torch.zeros(batch, heads, dk, dv, dtype=accumulation_dtype(dtype), device=device)
    return MemoryState(zero, zero, zero, 0)


def loss_gradient(err: torch.Tensor, loss: str, delta: float | torch.Tensor, p: float) -> torch.Tensor:
    """``φ(e)``: the inner loss's gradient with respect to the prediction ``M(k)``, elementwise on the error ``e``.

    - ``"l2"``: ``½‖e‖²`` → ``e`` (Titans);
    - ``"huber"``: ``Σ_j H_δ(e_j)`` → ``clamp(e, −δ, δ)`` (Miras' coordinate-wise Huber bias; ``δ`` a float or a
      tensor broadcasting against ``e``);
    - ``"lp"``: ``(1/p)‖e‖_p^p`` → ``sign(e)|e|^{p−1}`` (Moneta's ℓp bias; ``p = 1`` gives ``sign(e)``). At ``e = 0``
      the value is 0 and so is the derivative taken (for ``1 < p < 2`` the true one is infinite).
    - ``"huber_switch"``: Yaad's rule (Miras eq. 26), a switch on the whole error's norm: ``e`` (the ℓ2 gradient)
      while ``‖e‖₂ ≤ δ``, else ``δ·sign(e)`` (δ times the ℓ1 gradient); ``δ`` per token broadcasts as for Huber.
    """
    if loss == "l2":
        return err
    if loss == "huber":
        return torch.clamp(err, -delta, delta) if isinstance(delta, torch.Tensor) else err.clamp(-delta, delta)
    if loss == "huber_switch":
        small = torch.linalg.vector_norm(err, dim=-1, keepdim=True) <= delta
        return torch.where(small, err, delta * torch.sign(err))
    if loss != "lp":
        raise fail("loss", f"one of {list(LOSSES)}", repr(loss))
    if p == 2:
        return err
    mag = err.abs()
    nonzero = mag > 0
    safe = torch.where(nonzero, mag, torch.ones_like(mag))
    return torch.where(nonzero, torch.sign(err) * safe.pow(p - 1), torch.zeros_like(err))


def decay_products(gate: torch.Tensor) -> torch.Tensor:
    """``R_tj = Π_{j<m≤t} gate_m`` for ``j ≤ t`` (1 on the diagonal), 0 above: ``(…, C)`` → ``(…, C, C)``."""
    c = gate.shape[-1]
    t = torch.arange(c, device=gate.device)
    below = t[:, None] > t[None, :]
    factors = torch.where(below, gate[..., :, None], torch.ones((), dtype=gate.dtype, device=gate.device))
    return torch.cumprod(factors, dim=-2).masked_fill(t[:, None] < t[None, :], 0.0)


class _Coefficients:
    """What a group of chunks needs that does not depend on the memory, from its chunk-major ``(m, B·H, C)`` gates,
    real-token flags and end rows ``r`` ``(m,)`` (row ``C − 1``, or the last real token's):

    - :meth:`weighted` ``[diag(A) X, diag(f) X]``, against the stacked chunk-start ``[M₀; S₀]``;
    - :meth:`scores` ``X Yᵀ ⊙ G``, against the chunk's rows ``Φ``;
    - :meth:`ends` ``[diag(G_r·) K, diag(R^η_r·) K]``, :meth:`keep` (``A_r`` on the rows of M, ``E_r`` on those of
      S) and ``mix`` (``f_r``): the end state ``M_r = A_r M₀ + f_r S₀ − (diag(G_r·) K)ᵀ Φ``,
      ``S_r = E_r S₀ − (diag(R^η_r·) K)ᵀ Φ`` (see :func:`_advance`).
    """

    def __init__(self, keep: torch.Tensor, forget: torch.Tensor, real: torch.Tensor, ends: torch.Tensor) -> None:
        a = 1.0 - forget
        r_a, r_eta = decay_products(a), decay_products(keep)  # (m, BH, C, C)
        big_a, big_e = torch.cumprod(a, dim=-1), torch.cumprod(keep, dim=-1)  # A_t, E_t
        self.big_a = big_a
        # f_t = Σ_j R^a_tj E_j over real tokens j: a front pad leaves S unchanged but must not add S to M
        self.f = (r_a @ (big_e * real)[..., None])[..., 0]
        self.g = r_a @ r_eta  # G_ti, lower triangular
        chunks = torch.arange(keep.shape[0], device=keep.device)
        self.g_end, self.eta_end = self.g[chunks, :, ends], r_eta[chunks, :, ends]  # (m, BH, C)
        self.mix = self.f[chunks, :, ends, None, None]  # (m, BH, 1, 1)
        self.keep_m, self.keep_s = big_a[chunks, :, ends, None, None], big_e[chunks, :, ends, None, None]

    def weighted(self, x: torch.Tensor, i: slice | int = slice(None)) -> torch.Tensor:
        return torch.cat([self.big_a[i][..., None] * x, self.f[i][..., None] * x], dim=-1)

    def scores(self, x: torch.Tensor, y: torch.Tensor, i: slice | int = slice(None)) -> torch.Tensor:
        return (x @ y.transpose(-1, -2)) * self.g[i]

    def ends(self, keys: torch.Tensor, i: slice | int = slice(None)) -> torch.Tensor:
        return torch.cat([keys * self.g_end[i][..., None], keys * self.eta_end[i][..., None]], dim=-1)

    def keep(self, rows: int) -> torch.Tensor:
        m, bh = self.keep_m.shape[:2]
        return torch.cat([self.keep_m.expand(m, bh, rows, 1), self.keep_s.expand(m, bh, rows, 1)], dim=-2)


def _advance(both: torch.Tensor, keep: torch.Tensor, mix: torch.Tensor, ends: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
    """One chunk of ``[M; S]`` ``(BH, 2R, Dv)``: ``[A_r M + f_r S; E_r S] − endsᵀ Φ`` (``ends`` ``(BH, C, 2R)``)."""
    r = both.shape[-2] // 2
    nxt = torch.baddbmm(both * keep, ends.transpose(-1, -2), rows, alpha=-1.0)
    nxt[:, :r] += mix * both[:, r:]
    return nxt


class _Layout:
    """How a call's ``n`` tokens sit in chunks of ``c``: ``front`` tokens of the current chunk already seen (padded
    before the first token), ``nc`` chunks in all (the last one padded at the end), cut into groups of chunks."""

    def __init__(self, b: int, h: int, n: int, c: int, front: int, acc: torch.dtype) -> None:
        self.b, self.h, self.n, self.c, self.front, self.acc = b, h, n, c, front, acc
        self.nc = -(-(front + n) // c)
        self.group = max(1, GROUP_BUDGET // (b * h * c * c))

    def groups(self) -> list[tuple[int, int]]:
        return [(lo, min(self.nc, lo + self.group)) for lo in range(0, self.nc, self.group)]

    def tokens(self, lo: int, hi: int) -> tuple[int, int]:
        """The real tokens ``[first, stop)`` of chunks ``[lo, hi)``."""
        return max(lo * self.c - self.front, 0), min(hi * self.c - self.front, self.n)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x (B, H, N, ·)`` as one view per group of its real tokens (``split``, whose backward is one
        concatenation: slicing each group out would make its backward a sequence-wide zero tensor per group)."""
        return x.split([stop - first for first, stop in (self.tokens(lo, hi) for lo, hi in self.groups())], dim=2)

    def cut(self, x: torch.Tensor, lo: int, hi: int, fill: float,
            feature: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """A group's tokens ``x (B, H, ·, ·)`` (chunks ``[lo, hi)``, from :meth:`split`; mapped by ``feature``, padded
        with ``fill`` tokens) as ``(hi − lo, B·H, C, ·)``."""
        pad = (self.front if lo == 0 else 0, hi * self.c - self.front - self.tokens(lo, hi)[1])
        x = F.pad((x if feature is None else feature(x)).to(self.acc), (0, 0, *pad), value=fill)
        return x.reshape(self.b * self.h, hi - lo, self.c, x.shape[-1]).transpose(0, 1)

    def uncut(self, o: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """A group's ``(hi − lo, B·H, C, Dv)`` rows back to its real tokens ``(B, H, stop − first, Dv)``."""
        first, stop = self.tokens(lo, hi)
        skip = self.front if lo == 0 else 0
        return o.transpose(0, 1).reshape(self.b, self.h, (hi - lo) * self.c, -1)[:, :, skip : skip + stop - first]


@dataclass(frozen=True)
class _Group:
    """A group of chunks ``[lo, hi)`` ready for the loop: queries, keys, values ``(m, B·H, C, ·)``, learning rates
    ``(m, B·H, C)``, Huber thresholds (``(m, B·H, C, 1)`` or None) and the memory-free coefficients."""

    lo: int
    hi: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rate: torch.Tensor
    thresholds: torch.Tensor | None
    part: _Coefficients


def _groups(
    lay: _Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: tuple[torch.Tensor, ...],
    delta: float | torch.Tensor, features: FeatureMaps | None,
) -> Iterator[_Group]:
    """The call's groups of chunks, in order (inputs split once, each group padded and mapped on its own)."""
    fq, fk = (None, None) if features is None else features
    eta, theta, alpha = gates
    per_token = [(eta, 1.0), (theta, 0.0), (alpha, 0.0)] + ([(delta, 1.0)] if isinstance(delta, torch.Tensor) else [])
    pieces = [lay.split(x) for x in (q, k, v)] + [lay.split(g[..., None]) for g, _ in per_token]
    for index, (lo, hi) in enumerate(lay.groups()):
        qg, kg, vg, *tokens = (x[index] for x in pieces)
        keep, rate, forget, *rest = (lay.cut(g, lo, hi, fill) for g, (_, fill) in zip(tokens, per_token, strict=True))
        real = lay.cut(torch.ones_like(tokens[0]), lo, hi, 0.0)[..., 0]  # 0 on the padding
        ends = torch.full((hi - lo,), lay.c - 1, device=q.device)
        if hi == lay.nc:
            ends[-1] = (lay.front + lay.n - 1) % lay.c  # the last chunk's end state is read at its last real token
        yield _Group(lo, hi, lay.cut(qg, lo, hi, 0.0, fq), lay.cut(kg, lo, hi, 0.0, fk), lay.cut(vg, lo, hi, 0.0),
                     rate[..., 0], rest[0] if rest else None, _Coefficients(keep[..., 0], forget[..., 0], real, ends))


class _Outputs:
    """The call's output, group by group: written in place without autograd, else concatenated once."""

    def __init__(self, lay: _Layout, dv: int, dtype: torch.dtype, device: torch.device, training: bool) -> None:
        self.lay, self.dtype = lay, dtype
        self.whole = None if training else torch.empty(lay.b, lay.h, lay.n, dv, dtype=dtype, device=device)
        self.pieces: list[torch.Tensor] = []

    def add(self, o: torch.Tensor, lo: int, hi: int) -> None:
        """A group's ``(m, B·H, C, Dv)`` output rows."""
        o = self.lay.uncut(o, lo, hi)
        if self.whole is None:
            self.pieces.append(o.to(self.dtype))
        else:
            first, stop = self.lay.tokens(lo, hi)
            self.whole[:, :, first:stop] = o

    def result(self) -> torch.Tensor:
        if self.whole is not None:
            return self.whole
        return torch.cat(self.pieces, dim=2) if len(self.pieces) > 1 else self.pieces[0]


def _training(*tensors: object) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, *,
    chunk: int, loss: str = "l2", delta: float | torch.Tensor = 1.0, p: float = 2.0, state: MemoryState | None = None,
    features: FeatureMaps | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """``q, k (B, H, N, Dk)``, ``v (B, H, N, Dv)``, gates ``eta, theta, alpha (B, H, N)`` (and ``delta`` a float or
    ``(B, H, N)``); continues ``state`` (None: an empty memory). Returns ``(o (B, H, N, Dv), state)``.

    ``features``: per-token maps ``(φ_q, φ_k)`` (a normalisation, a scale) applied to each group's queries and keys, so
    that no mapped copy of the whole sequence is made: groups of chunks bound every temporary (:data:`GROUP_BUDGET`),
    as sequence-wide temporaries are fresh memory to fault in on every call."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = empty_state(b, h, dk, dv, q.dtype, q.device)
    lay = _Layout(b, h, n, chunk, state.position, accumulation_dtype(q.dtype))
    # the running state [M; S] as one (B·H, 2Dk, Dv) tensor, and the memory the current chunk's errors are taken at
    both = torch.cat([state.memory, state.momentum], dim=-2).to(lay.acc).reshape(b * h, 2 * dk, dv)
    start = state.chunk_start.to(lay.acc).reshape(b * h, dk, dv)
    outputs = _Outputs(lay, dv, v.dtype, q.device, _training(q, k, v, eta, theta, alpha, delta))
    for grp in _groups(lay, q, k, v, (eta, theta, alpha), delta, features):
        part = grp.part
        keeps, weights = part.keep(dk), part.ends(grp.k)
        starts, rows = [], []
        for i in range(grp.hi - grp.lo):
            err = torch.baddbmm(grp.v[i], grp.k[i], start, beta=-1.0)  # K M₀ − V
            threshold = delta if grp.thresholds is None else grp.thresholds[i]
            phi = loss_gradient(err, loss, threshold, p) * grp.rate[i][..., None]
            starts.append(both)
            rows.append(phi)
            last_start, both = start, _advance(both, keeps[i], part.mix[i], weights[i], phi)
            start = both[:, :dk]
        o = part.weighted(grp.q) @ torch.stack(starts) - part.scores(grp.q, grp.k) @ torch.stack(rows)
        outputs.add(o, grp.lo, grp.hi)
    position = (lay.front + n) % chunk
    shape = (b, h, dk, dv)
    memory, momentum = both[:, :dk].reshape(shape), both[:, dk:].reshape(shape)
    return outputs.result(), MemoryState(memory, momentum, last_start.reshape(shape) if position else memory, position)


@dataclass(frozen=True)
class DeepMemoryState:
    """Where a two-layer memory stands between calls: ``weights`` ``(W₁ (B, H, Dk, E), W₂ (B, H, E, Dv))``, their
    ``momenta``, the ``chunk_start`` weights the current chunk's gradients are taken at and the ``position`` in it."""

    weights: tuple[torch.Tensor, torch.Tensor]
    momenta: tuple[torch.Tensor, torch.Tensor]
    chunk_start: tuple[torch.Tensor, torch.Tensor]
    position: int

    @property
    def nbytes(self) -> int:
        """The bytes the state holds (three copies of the memory's weights, whatever the length decoded)."""
        return sum(t.numel() * t.element_size() for t in (*self.weights, *self.momenta, *self.chunk_start))


def silu_slope(h: torch.Tensor) -> torch.Tensor:
    """``d SiLU(h) / dh = σ(h) (1 + h (1 − σ(h)))``."""
    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


def chunked_mlp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor,
    w1: torch.Tensor, w2: torch.Tensor, *, chunk: int, loss: str = "l2", delta: float | torch.Tensor = 1.0,
    p: float = 2.0, state: DeepMemoryState | None = None, features: FeatureMaps | None = None,
) -> tuple[torch.Tensor, DeepMemoryState]:
    """The two-layer memory ``M(x) = SiLU(x W₁) W₂`` under the same rule (see :mod:`attnzoo.methods.linear.titans_mlp`):
    ``w1 (H, Dk, E)``, ``w2 (H, E, Dv)`` its initial weights per head (used when ``state`` is None); other arguments
    as :func:`chunked`.

    Within a chunk, with ``Hk = K W₁⁰``, ``Ak = SiLU(Hk)`` at the chunk-start weights and ``Φ`` the rows
    ``θ_i φ(Ak W₂⁰ − V)_i``, the gradients are ``∂W₂ = Σ_i a_i φ_iᵀ`` and ``∂W₁ = Σ_i k_i δ_iᵀ`` with
    ``Δ = (Φ W₂⁰ᵀ) ⊙ SiLU′(Hk)``: each layer is a linear memory written by its own keys (``K``, then ``Ak``) and rows
    (``Δ``, then ``Φ``). So a query reads layer 1 with the linear chunk formula, ``Hq = diag(A) Q W₁ + diag(f) Q S₁ −
    (Q Kᵀ ⊙ G) Δ``, then layer 2 with the same formula on ``SiLU(Hq)`` against the keys ``Ak`` and rows ``Φ``: the
    per-token weights ``W_t`` are never formed."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    e = w1.shape[-1]
    lay = _Layout(b, h, n, chunk, 0 if state is None else state.position, accumulation_dtype(q.dtype))
    if state is None:
        first = tuple(w.to(lay.acc).expand(b, *w.shape) for w in (w1, w2))
        state = DeepMemoryState(first, tuple(torch.zeros_like(w) for w in first), first, 0)  # type: ignore[arg-type]
    sizes = ((dk, e), (e, dv))
    both = [torch.cat([w, s], dim=-2).to(lay.acc).reshape(b * h, 2 * r, c)
            for w, s, (r, c) in zip(state.weights, state.momenta, sizes, strict=True)]
    start = [w.to(lay.acc).reshape(b * h, r, c) for w, (r, c) in zip(state.chunk_start, sizes, strict=True)]
    outputs = _Outputs(lay, dv, v.dtype, q.device, _training(q, k, v, eta, theta, alpha, delta, w1, w2))
    for grp in _groups(lay, q, k, v, (eta, theta, alpha), delta, features):
        part = grp.part
        keep1, keep2, ends1 = part.keep(dk), part.keep(e), part.ends(grp.k)
        layer1 = part.weighted(grp.q)  # against the chunk-start [W₁; S₁]
        scores1 = part.scores(grp.q, grp.k)
        outs = []
        for i in range(grp.hi - grp.lo):
            hk = grp.k[i] @ start[0]  # (BH, C, E)
            ak = F.silu(hk)
            threshold = delta if grp.thresholds is None else grp.thresholds[i]
            phi = loss_gradient(torch.baddbmm(grp.v[i], ak, start[1], beta=-1.0), loss, threshold, p)
            phi = phi * grp.rate[i][..., None]
            dh = (phi @ start[1].transpose(-1, -2)) * silu_slope(hk)
            aq = F.silu(layer1[i] @ both[0] - scores1[i] @ dh)
            outs.append(part.weighted(aq, i) @ both[1] - part.scores(aq, ak, i) @ phi)
            last_start = start
            both = [_advance(both[0], keep1[i], part.mix[i], ends1[i], dh),
                    _advance(both[1], keep2[i], part.mix[i], part.ends(ak, i), phi)]
            start = [both[0][:, :dk], both[1][:, :e]]
        outputs.add(torch.stack(outs), grp.lo, grp.hi)
    position = (lay.front + n) % chunk
    weights = tuple(x[:, :r].reshape(b, h, r, c) for x, (r, c) in zip(both, sizes, strict=True))
    momenta = tuple(x[:, r:].reshape(b, h, r, c) for x, (r, c) in zip(both, sizes, strict=True))
    begun = tuple(x.reshape(b, h, *x.shape[1:]) for x in last_start) if position else weights
    return outputs.result(), DeepMemoryState(weights, momenta, begun, position)  # type: ignore[arg-type]


def step(
    state: MemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor,
    alpha: torch.Tensor, *, chunk: int, loss: str = "l2", delta: float | torch.Tensor = 1.0, p: float = 2.0,
) -> tuple[torch.Tensor, MemoryState]:
    """One token: ``q, k (B, H, 1, Dk)``, ``v (B, H, 1, Dv)``, gates ``(B, H, 1)``; returns ``(o, state)``."""
    if q.shape[2] != 1:
        raise fail("q", "one token per step (seq 1)", f"seq {q.shape[2]}")
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    expected = (b, h, dk, dv)
    if tuple(state.memory.shape) != expected:
        raise fail("state", f"memory of shape {expected}", tuple(state.memory.shape))
    acc, out_dtype = state.memory.dtype, v.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    start = state.memory if state.position == 0 else state.chunk_start
    threshold = delta.to(acc)[..., None] if isinstance(delta, torch.Tensor) else delta
    phi = loss_gradient(k @ start - v, loss, threshold, p) * theta.to(acc)[..., None]  # (B, H, 1, Dv)
    momentum = eta.to(acc)[..., None] * state.momentum - k.transpose(-1, -2) @ phi
    memory = (1.0 - alpha.to(acc))[..., None] * state.memory + momentum
    position = (state.position + 1) % chunk
    return (q @ memory).to(out_dtype), MemoryState(memory, momentum, memory if position == 0 else start, position)
