"""Linear-attention scans: chunked causal (training/prefill), noncausal, and one recurrent step (decoding).

Every function works on *features*: ``qf (B, H, N, F)``, ``kf (B, Hkv, N, F)`` (already passed through a method's
feature map and scaled) and ``v (B, Hkv, N, Dv)``, and computes

    o_i = Σ_{j ≤ i} λ_h^{i−j} (qf_i · kf_j) v_j          (causal; λ_h = exp(−decay_h), λ = 1 without decay)
    o_i = Σ_j (qf_i · kf_j) v_j                          (noncausal)

optionally normalised: ``o_i / (the same sum with v_j = 1)`` (``normalize=True``); a row whose normaliser is not
positive (features that are all zero) gives 0, never NaN or inf. The normaliser rides along as one extra column of
ones appended to ``v``, so numerator and denominator come out of the same matmuls and the same state.

Recurrent state: a tensor ``(B, Hs, F, Dv + normalize)`` holding ``Σ_j λ^{t−j} kf_j v_jᵀ`` (and ``Σ_j λ^{t−j} kf_j``
as its last column when normalising). ``Hs = Hkv`` without decay (GQA: query heads share their key head's state, no
copies), ``Hs = H`` with a per-head decay (each query head decays its own state). Its size does not depend on the
position, so a decoding step costs the same at position 1k and 64k. The state returned by :func:`causal` with
``return_state=True`` equals the one reached by :func:`step` token by token, so generation continues from a prefill.

Chunked causal form (chunk ``C``): the sequence is padded *at the front* with zeros (zero keys/values add nothing,
so the final state is exact even with decay) to ``n·C`` tokens, and all chunks are computed as batched matmuls:

- intra-chunk: ``(qf_c kf_cᵀ ⊙ D) v_c`` with ``D_ts = λ^{t−s}`` for ``s ≤ t`` (0 above the diagonal);
- chunk states: ``U_c = Σ_s λ^{C−1−s} kf_s v_sᵀ``; the state before chunk ``c`` is the exclusive scan
  ``S_c = λ^C S_{c−1} + U_{c−1}``: a cumulative sum without decay, a short loop over chunks (tiny ``F×Dv`` adds)
  with decay, so no decay factor ever exceeds 1 (no ``λ^{−i}`` rescaling that would overflow). Chunk states are
  computed group by group from the running state, so no temporary spans the sequence;
- inter-chunk: ``λ^{t+1} qf_t S_c``.

GQA: the ``G = H / Hkv`` query heads of a group are stacked as extra rows of one matmul against their key head's
chunk, so keys and values are never repeated; with a decay, the key side is weighted per query head (a ``G``-fold
weighted copy of the key chunk, needed because each head decays differently). Outputs are computed over groups of
chunks so the intra-chunk scores never exceed ``SCORES_BUDGET`` elements at once: forward memory is O(N·(F+Dv) +
budget), linear in N. fp16/bf16 inputs are computed and accumulated in fp32 (state included) and the output is cast
back.

Training: a hand-written backward (:class:`_ChunkedScan`) recomputes features and intra-chunk scores group by group,
so training memory stays O(N·(F+Dv)) (autograd would keep every group's scores: N·C per head); with a learnable
decay (a tensor requiring grad), or when the final state is returned, the forward loop is differentiated by autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail

SCORES_BUDGET = 1 << 22  # 16 MiB of fp32 scores per chunk group

FeatureMaps = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scans compute in: fp32 for half-precision inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _with_ones(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1) if normalize else v


def _finish(o: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """Split the normaliser column off and divide where it is positive (0 elsewhere, with finite gradients)."""
    if normalize:
        num, den = o[..., :-1], o[..., -1:]
        positive = den > 0
        safe = torch.where(positive, den, torch.ones_like(den))
        o = (num / safe if o.requires_grad else num.div_(safe)).masked_fill_(~positive, 0.0)
    return o.to(dtype)


def _scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x * w``, in place (no copy of ``x``) unless autograd needs ``x`` to differentiate ``w``."""
    return x * w if w.requires_grad else x.mul_(w)


def _log_decay(decay: torch.Tensor, heads: int, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-step log factor ``−decay`` as ``(Hkv, G)``."""
    return (-decay.to(dtype)).reshape(kv_heads, heads // kv_heads)


def causal(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None = None, chunk: int = 128,
    normalize: bool = False, return_state: bool = False, features: FeatureMaps | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked causal linear attention (see the module docstring); ``decay`` is a ``(H,)`` non-negative rate.

    ``features``: parameter-free per-token maps ``(φ_q, φ_k)`` (``(…, D) -> (…, F)``, each token on its own), applied
    to ``qf`` and ``kf`` one chunk group at a time, so that the features of a long sequence never exist at once (each
    sequence-wide tensor is fresh memory to touch on every call); the backward recomputes them per group. The front
    padding's values (normaliser column included) are zero, so whatever features the maps give the padded tokens,
    they contribute nothing.
    """
    out_dtype = v.dtype
    acc = accumulation_dtype(qf.dtype)
    qf, kf, v = qf.to(acc), kf.to(acc), v.to(acc)
    params = (qf, kf, v) if decay is None else (qf, kf, v, decay)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    if training and not return_state and (decay is None or not decay.requires_grad):
        return _ChunkedScan.apply(qf, kf, v, decay, chunk, normalize, features).to(out_dtype)
    grid = _Grid(qf, kf, chunk)
    o_ext, final, _ = _scan(grid, qf, kf, v, decay=decay, normalize=normalize, features=features, training=training)
    out = _finish(grid.unpad(o_ext), normalize, out_dtype)
    return (out, final) if return_state else out


class _Grid:
    """How a ``(B, H, N, ·)`` sequence is cut: front padding to ``nc`` chunks of ``c`` tokens, ``g`` query heads per
    key head, and groups of ``step`` chunks whose intra-chunk scores stay within ``SCORES_BUDGET`` elements."""

    def __init__(self, qf: torch.Tensor, kf: torch.Tensor, chunk: int) -> None:
        self.b, self.h, self.n, _ = qf.shape
        self.hkv = kf.shape[1]
        self.g = self.h // self.hkv
        self.c = max(1, min(chunk, self.n))
        self.pad = (-self.n) % self.c
        self.nc = (self.n + self.pad) // self.c
        self.step = max(1, SCORES_BUDGET // (self.b * self.h * self.c * self.c))
        self.bounds = [*range(0, self.nc, self.step), self.nc]  # chunk-group borders
        # tokens of each group in the unpadded sequence (the first group holds the padding)
        self.sizes = [hi * self.c - max(lo * self.c, self.pad) for lo, hi in zip(self.bounds, self.bounds[1:])]

    def cut(self, x: torch.Tensor, *, query: bool = False, ones: bool = False) -> list[torch.Tensor]:
        """``x (B, ·, N, E)`` cut into chunk groups, chunk-major: ``(B, Hkv, m, G, C, E)`` for queries (``H`` heads),
        ``(B, Hkv, m, C, E)`` for keys; ``ones`` appends the normaliser column before the zero padding. Views where
        possible; only the first group is padded, so no copy spans the sequence (and ``split`` backpropagates as one
        concatenation)."""
        groups = []
        for i, part in enumerate(x.split(self.sizes, dim=2)):
            part = _with_ones(part, ones)
            if i == 0 and self.pad:
                part = F.pad(part, (0, 0, self.pad, 0))
            m, e = part.shape[2] // self.c, part.shape[-1]
            if query:
                groups.append(part.reshape(self.b, self.hkv, self.g, m, self.c, e).transpose(2, 3))
            else:
                groups.append(part.reshape(self.b, self.hkv, m, self.c, e))
        return groups

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, nc, C, E)`` chunk-major back to ``(B, H, N, E)``."""
        return x.reshape(self.b, self.h, self.nc * self.c, x.shape[-1])[:, :, self.pad :]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """A group's ``(B, Hkv, m, G, C, E)`` queries as ``(B, Hkv, m, G·C, E)`` rows of one matmul."""
        return x.reshape(self.b, self.hkv, x.shape[2], self.g * self.c, x.shape[-1])

    def lower(self, device: torch.device) -> torch.Tensor:
        t = torch.arange(self.c, device=device)
        return t[:, None] >= t[None, :]


def _decay_factors(
    grid: _Grid, decay: torch.Tensor, dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D, q_fac, k_fac, λ^C)``: the intra-chunk weights ``D_ts = λ^{t−s}`` (``s ≤ t``, else 0) as
    ``(Hkv, G, C, C)``, ``λ^{t+1}`` and ``λ^{C−1−s}`` as ``(Hkv, G, C)``, and ``λ^C`` as ``(1, Hkv, G, 1, 1)``."""
    la = _log_decay(decay, grid.h, grid.hkv, dtype)  # (Hkv, G)
    tf = torch.arange(grid.c, device=device, dtype=dtype)
    diff = (tf[:, None] - tf[None, :]).clamp_min(0)
    weight = torch.where(grid.lower(device), torch.exp(la[..., None, None] * diff), torch.zeros((), dtype=dtype))
    q_fac = torch.exp(la[..., None] * (tf + 1))
    k_fac = torch.exp(la[..., None] * (grid.c - 1 - tf))
    return weight, q_fac, k_fac, torch.exp(la * grid.c)[None, :, :, None, None]


def _scan(
    grid: _Grid, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None, normalize: bool,
    features: FeatureMaps | None, training: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The chunked forward: ``(o, final state, running state at the start of each chunk group)``, ``o`` chunk-major
    ``(B, Hkv, G, nc, C, Dv + normalize)`` with the normaliser as its last column (not divided yet)."""
    b, hkv, g, c, nc = grid.b, grid.hkv, grid.g, grid.c, grid.nc
    f = (features[0](qf[:, :, :1]) if features is not None else qf).shape[-1]  # feature width (state rows)
    dve = v.shape[-1] + int(normalize)
    lower = grid.lower(qf.device)

    intra_weight: torch.Tensor | None = None
    if decay is None:
        state = qf.new_zeros(b, hkv, f, dve)  # the running state before the current group's first chunk
    else:
        intra_weight, q_fac, k_fac, lam = _decay_factors(grid, decay, qf.dtype, qf.device)
        state = qf.new_zeros(b, hkv, g, f, dve)

    # Groups of chunks bound the scores in memory, and each group computes its own chunk states from the running
    # state, so no temporary spans the whole sequence: large temporaries would be fresh (page-faulting) memory on every
    # call, measured to make N=65536 cost 18x N=8192. Without autograd the output is written in place.
    o_all = None if training else qf.new_empty(b, hkv, g, nc, c, dve)
    pieces, starts = [], []
    lo = 0
    groups = zip(grid.cut(qf, query=True), grid.cut(kf), grid.cut(v, ones=normalize), strict=True)
    for q_g, k_g, v_g in groups:
        starts.append(state)
        m = q_g.shape[2]
        if features is not None:  # padded tokens may get non-zero features: their all-zero values weigh them by 0
            q_g, k_g = features[0](q_g), features[1](k_g)
        rows = grid.rows(q_g)
        if decay is None:
            u = k_g.transpose(-1, -2) @ v_g  # (B, Hkv, m, F, Dve)
            prev_g = _exclusive_cumsum(u, state)
            state = prev_g[:, :, -1] + u[:, :, -1]
            inter = rows @ prev_g
        else:
            kw = k_g[:, :, :, None] * k_fac[None, :, None, :, :, None]  # (B, Hkv, m, G, C, F)
            u = kw.transpose(-1, -2) @ v_g[:, :, :, None]  # (B, Hkv, m, G, F, Dve)
            states, state = _decayed_states(u, state, lam)
            inter = _scaled(q_g @ states, q_fac[None, :, None, :, :, None])
            del kw, states
        scores = (rows @ k_g.transpose(-1, -2)).view(b, hkv, m, g, c, c)
        if intra_weight is None:
            scores = scores.masked_fill_(~lower, 0.0)
        else:
            scores = _scaled(scores, intra_weight[None, :, None])
        o = scores.view(b, hkv, m, g * c, c) @ v_g
        o = o.add_(inter.reshape(o.shape)).view(b, hkv, m, g, c, dve).transpose(2, 3)
        if o_all is None:
            pieces.append(o)
        else:
            o_all[:, :, :, lo : lo + m] = o
        lo += m
        del scores, inter, u
    final = state.reshape(b, grid.h, f, dve) if decay is not None else state
    if o_all is None:
        o_all = torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0]
    return o_all, final, starts


def _decayed_states(u: torch.Tensor, state: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states before each chunk of a group, ``S_{c+1} = λ^C S_c + U_c`` from ``state``, stacked along dim 2, and
    the state after the group (a short loop of tiny ``F×Dv`` updates)."""
    states = []
    for u_i in u.unbind(dim=2):  # unbind, not u[:, :, i]: its backward is one stack, not m scatters
        states.append(state)
        state = lam * state + u_i
    return torch.stack(states, dim=2), state


def _exclusive_cumsum(u: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start + Σ_{c' < c} u_c'`` along dim 2 (the states before each chunk of a group)."""
    return torch.cat([torch.zeros_like(u[:, :, :1]), u[:, :, :-1]], dim=2).cumsum(dim=2) + start[:, :, None]


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan (decay fixed or absent) with a hand-written backward that recomputes features and intra-chunk
    scores group by group: saved are the inputs, the output and one state per chunk group, never the scores.

    With ``D`` the intra-chunk weights (``D_ts = λ^{t−s}`` for ``s ≤ t``, else 0; ``λ = 1`` without decay),
    ``P = (qf_c kf_cᵀ) ⊙ D``, ``dP = (dO_c v_cᵀ) ⊙ D``, ``S_c`` the state before chunk ``c`` (per query head with a
    decay) and ``R_c`` the gradient of the state after it, the reverse recurrence ``R_{c−1} = λ^C R_c +
    Σ_t λ^{t+1} qf_tᵀ dO_t`` (a reverse running sum without decay):

        dqf_t = (dP kf_c)_t + λ^{t+1} dO_t S_cᵀ
        dkf_s = (dPᵀ qf_c)_s + λ^{C−1−s} v_s R_cᵀ
        dv_s  = (Pᵀ dO_c)_s + λ^{C−1−s} kf_s R_c

    GQA: the query heads of a group are rows of the same matmuls, so the sums over them come out of the products (with
    a decay, the key side sums its per-head terms). The normaliser column's gradient is ``−(dO·o)/den``; the value
    gradient skips that column (it is a constant). A learnable decay (a tensor requiring grad) is not served here: the
    caller differentiates the forward loop with autograd instead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qf: torch.Tensor,
        kf: torch.Tensor,
        v: torch.Tensor,
        decay: torch.Tensor | None,
        chunk: int,
        normalize: bool,
        features: FeatureMaps | None,
    ) -> torch.Tensor:
        grid = _Grid(qf, kf, chunk)
        o_ext, _, starts = _scan(grid, qf, kf, v, decay=decay, normalize=normalize, features=features, training=False)
        if normalize:  # in place: o_ext becomes [o, den]
            num, den = o_ext[..., :-1], o_ext[..., -1:]
            positive = den > 0
            num.div_(torch.where(positive, den, torch.ones_like(den))).masked_fill_(~positive, 0.0)
        ctx.save_for_backward(qf, kf, v, o_ext, torch.stack(starts))
        ctx.grid, ctx.normalize, ctx.features, ctx.decay = grid, normalize, features, decay
        out = grid.unpad(o_ext)
        return out[..., :-1] if normalize else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        qf, kf, v, o_ext, starts = ctx.saved_tensors
        grid, normalize, features, decay = ctx.grid, ctx.normalize, ctx.features, ctx.decay
        b, hkv, g, c = grid.b, grid.hkv, grid.g, grid.c
        dv_width = v.shape[-1]
        q_, k_, v_ = grid.cut(qf, query=True), grid.cut(kf), grid.cut(v, ones=normalize)
        do_ = grid.cut(grad.to(qf.dtype), query=True)
        length = grid.nc * c
        dq, dk = qf.new_empty(b, grid.h, length, qf.shape[-1]), qf.new_empty(b, hkv, length, kf.shape[-1])
        dv = qf.new_empty(b, hkv, length, dv_width)
        dq_ = dq.view(b, hkv, g, grid.nc, c, -1).transpose(2, 3)
        dk_, dv_ = dk.view(b, hkv, grid.nc, c, -1), dv.view(b, hkv, grid.nc, c, -1)
        if decay is None:
            upper = ~grid.lower(qf.device)
        else:
            weight, q_fac, k_fac, lam = _decay_factors(grid, decay, qf.dtype, qf.device)
            weight = weight[None, :, None]  # (1, Hkv, 1, G, C, C), like the scores
            q_fac, k_fac = q_fac[None, :, None, ..., None], k_fac[None, :, None, ..., None]  # (1, Hkv, 1, G, C, 1)
        reverse = qf.new_zeros(starts.shape[1:])  # R: the gradient of the state after the current group
        for i in reversed(range(len(q_))):
            lo, hi = grid.bounds[i], grid.bounds[i + 1]
            m = hi - lo
            q_g, k_g, v_g, do_g = q_[i], k_[i], v_[i], do_[i]
            if normalize:
                o_g = o_ext.transpose(2, 3)[:, :, lo:hi]
                den = o_g[..., -1:]
                inv = torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
                do_g = torch.cat([do_g * inv, -(do_g * o_g[..., :-1]).sum(-1, keepdim=True) * inv], dim=-1)
            if features is not None:
                with torch.enable_grad():
                    q_in, k_in = q_g.detach().requires_grad_(), k_g.detach().requires_grad_()
                    q_g, k_g = features[0](q_in), features[1](k_in)
            qd, kd = q_g.detach(), k_g.detach()  # (B, Hkv, m, G, C, F), (B, Hkv, m, C, F)
            rd, d_rows = grid.rows(qd), grid.rows(do_g)
            p = (rd @ kd.transpose(-1, -2)).view(b, hkv, m, g, c, c)
            dp = (d_rows @ v_g.transpose(-1, -2)).view(b, hkv, m, g, c, c)
            if decay is None:
                p, dp = p.masked_fill_(upper, 0.0), dp.masked_fill_(upper, 0.0)
            else:
                p, dp = p.mul_(weight), dp.mul_(weight)
            p, dp = p.view(b, hkv, m, g * c, c), dp.view(b, hkv, m, g * c, c)
            dqf = dp @ kd
            dkf = dp.transpose(-1, -2) @ rd
            dvs = p.transpose(-1, -2) @ d_rows
            if decay is None:
                prev = _exclusive_cumsum(kd.transpose(-1, -2) @ v_g, starts[i])  # S_c
                w = rd.transpose(-1, -2) @ d_rows  # qf_cᵀ dO_c, summed over the query heads of a group
                later = _exclusive_cumsum(w.flip(2), reverse).flip(2)  # R_c
                reverse = reverse + w.sum(dim=2)
                dqf += d_rows @ prev.transpose(-1, -2)
                dkf += v_g @ later.transpose(-1, -2)
                dvs += kd @ later
            else:
                kw = kd[:, :, :, None] * k_fac  # (B, Hkv, m, G, C, F)
                states, _ = _decayed_states(kw.transpose(-1, -2) @ v_g[:, :, :, None], starts[i], lam)
                ds = (qd * q_fac).transpose(-1, -2) @ do_g  # (B, Hkv, m, G, F, Dve)
                laters = []
                for ds_j in reversed(ds.unbind(dim=2)):
                    laters.append(reverse)
                    reverse = lam * reverse + ds_j
                later = torch.stack(laters[::-1], dim=2)  # R_c per query head
                dqf += ((do_g * q_fac) @ states.transpose(-1, -2)).view(dqf.shape)
                dkf += ((v_g[:, :, :, None] @ later.transpose(-1, -2)) * k_fac).sum(dim=3)
                dvs += (kw @ later).sum(dim=3)
            dv_[:, :, lo:hi] = dvs[..., :dv_width]
            dqf = dqf.view(b, hkv, m, g, c, -1)
            if features is not None:
                dqf, dkf = torch.autograd.grad((q_g, k_g), (q_in, k_in), (dqf, dkf))
            dq_[:, :, lo:hi] = dqf
            dk_[:, :, lo:hi] = dkf
        pad = grid.pad
        return dq[:, :, pad:], dk[:, :, pad:], dv[:, :, pad:], None, None, None, None


def noncausal(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``qf (kfᵀ v)``, the key/value summary computed once per key head (works for cross lengths too)."""
    out_dtype = v.dtype
    acc = accumulation_dtype(qf.dtype)
    b, h, n, f = qf.shape
    hkv = kf.shape[1]
    v = _with_ones(v.to(acc), normalize)
    summary = kf.to(acc).transpose(-1, -2) @ v  # (B, Hkv, F, Dve)
    o = qf.to(acc).reshape(b, hkv, (h // hkv) * n, f) @ summary
    return _finish(o.view(b, h, n, v.shape[-1]), normalize, out_dtype)


def empty_state(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None, normalize: bool,
) -> torch.Tensor:
    """The zero state for a sequence about to start (shapes from one token's features)."""
    heads = qf.shape[1] if decay is not None else kf.shape[1]
    return torch.zeros(
        qf.shape[0], heads, qf.shape[-1], v.shape[-1] + int(normalize),
        dtype=accumulation_dtype(qf.dtype), device=qf.device,
    )


def step(
    state: torch.Tensor, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``S ← λ S + kf vᵀ``, ``o = qf S`` for one token ``qf (B, H, 1, F)``; returns ``(o, S)``."""
    if qf.shape[2] != 1 or kf.shape[2] != 1 or v.shape[2] != 1:
        raise fail("q", "one token per step (seq 1 for q, k and v)", f"seq {qf.shape[2]}, {kf.shape[2]}, {v.shape[2]}")
    out_dtype = v.dtype
    acc = state.dtype
    b, h, _, f = qf.shape
    hkv = kf.shape[1]
    g = h // hkv
    v = _with_ones(v.to(acc), normalize)
    dve = v.shape[-1]
    expected = (b, h if decay is not None else hkv, f, dve)
    if tuple(state.shape) != expected:
        raise fail("state", f"shape {expected}", tuple(state.shape))
    # S + kf vᵀ as one batched baddbmm (an outer product through matmul is slow on CPU)
    k_col = kf.to(acc).transpose(-1, -2)  # (B, Hkv, F, 1)
    q_rows = qf.to(acc).reshape(b, hkv, g, f)
    if decay is None:
        state = torch.baddbmm(state.reshape(-1, f, dve), k_col.reshape(-1, f, 1), v.reshape(-1, 1, dve))
        state = state.view(b, hkv, f, dve)
        o = q_rows @ state
    else:
        lam = torch.exp(_log_decay(decay, h, hkv, acc))[None, :, :, None, None]
        base = (lam * state.view(b, hkv, g, f, dve)).reshape(-1, f, dve)
        k_col = k_col[:, :, None].expand(b, hkv, g, f, 1).reshape(-1, f, 1)
        v_row = v[:, :, None].expand(b, hkv, g, 1, dve).reshape(-1, 1, dve)
        state = torch.baddbmm(base, k_col, v_row).view(b, h, f, dve)
        o = q_rows.view(b, h, 1, f) @ state
    return _finish(o.reshape(b, h, 1, dve), normalize, out_dtype), state
