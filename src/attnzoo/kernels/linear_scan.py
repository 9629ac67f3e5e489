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
back. Everything is plain autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnzoo.errors import fail

SCORES_BUDGET = 1 << 22  # 16 MiB of fp32 scores per chunk group


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
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    chunk: int = 128,
    normalize: bool = False,
    return_state: bool = False,
    feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked causal linear attention (see the module docstring); ``decay`` is a ``(H,)`` non-negative rate.

    ``feature``: an elementwise (shape-preserving) feature map applied to ``qf`` and ``kf`` one chunk group at a time,
    so that the features of a long sequence never exist at once (each sequence-wide tensor is fresh memory to touch on
    every call). The front padding's values (normaliser column included) are zero, so whatever features the map
    gives the padded tokens, they contribute nothing.
    """
    out_dtype = v.dtype
    acc = accumulation_dtype(qf.dtype)
    b, h, n, f = qf.shape
    hkv = kf.shape[1]
    g = h // hkv
    c = max(1, min(chunk, n))
    pad = (-n) % c
    qf, kf = qf.to(acc), kf.to(acc)
    v = _with_ones(v.to(acc), normalize)
    if pad:
        qf, kf, v = (F.pad(t, (0, 0, pad, 0)) for t in (qf, kf, v))
    nc = (n + pad) // c
    dve = v.shape[-1]
    q_ = qf.reshape(b, hkv, g, nc, c, f).transpose(2, 3)  # (B, Hkv, n, G, C, F)
    k_ = kf.reshape(b, hkv, nc, c, f)
    v_ = v.reshape(b, hkv, nc, c, dve)
    t = torch.arange(c, device=qf.device)
    lower = t[:, None] >= t[None, :]

    intra_weight: torch.Tensor | None = None
    if decay is None:
        state = qf.new_zeros(b, hkv, f, dve)  # the running state before the current group's first chunk
    else:
        la = _log_decay(decay, h, hkv, acc)  # (Hkv, G)
        tf = t.to(acc)
        diff = (tf[:, None] - tf[None, :]).clamp_min(0)
        intra_weight = torch.where(lower, torch.exp(la[..., None, None] * diff), torch.zeros((), dtype=acc))
        q_fac = torch.exp(la[..., None] * (tf + 1))  # (Hkv, G, C)
        k_fac = torch.exp(la[..., None] * (c - 1 - tf))
        lam = torch.exp(la * c)[None, :, :, None, None]  # (1, Hkv, G, 1, 1)
        state = qf.new_zeros(b, hkv, g, f, dve)

    # Groups of chunks bound the scores in memory, and each group computes its own chunk states from the running
    # state, so no temporary spans the whole sequence: large temporaries would be fresh (page-faulting) memory on every
    # call, measured to make N=65536 cost 18x N=8192. Pieces come from split (its backward is one concatenation, where
    # slicing would allocate a full-size gradient per group). Without autograd the output is written in place.
    per_chunk = b * h * c * c
    step_chunks = max(1, SCORES_BUDGET // per_chunk)
    params = (qf, kf, v) if decay is None else (qf, kf, v, decay)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    o_all = None if training else qf.new_empty(b, hkv, g, nc, c, dve)
    pieces = []
    lo = 0
    for q_g, k_g, v_g in zip(*(t.split(step_chunks, dim=2) for t in (q_, k_, v_)), strict=True):
        m = q_g.shape[2]
        if feature is not None:  # padded tokens may get non-zero features: their all-zero values weigh them by 0
            q_g, k_g = feature(q_g), feature(k_g)
        rows = q_g.reshape(b, hkv, m, g * c, f)
        if decay is None:
            u = k_g.transpose(-1, -2) @ v_g  # (B, Hkv, m, F, Dve)
            prev_g = torch.cat([torch.zeros_like(u[:, :, :1]), u[:, :, :-1]], dim=2).cumsum(dim=2) + state[:, :, None]
            state = prev_g[:, :, -1] + u[:, :, -1]
            inter = rows @ prev_g
        else:
            kw = k_g[:, :, :, None] * k_fac[None, :, None, :, :, None]  # (B, Hkv, m, G, C, F)
            u = kw.transpose(-1, -2) @ v_g[:, :, :, None]  # (B, Hkv, m, G, F, Dve)
            states = []
            for u_i in u.unbind(dim=2):  # unbind, not u[:, :, i]: its backward is one stack, not m scatters
                states.append(state)
                state = lam * state + u_i
            inter = _scaled(q_g @ torch.stack(states, dim=2), q_fac[None, :, None, :, :, None])
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
    final = state.reshape(b, h, f, dve) if decay is not None else state
    if o_all is None:
        o_all = torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0].contiguous()
    out = _finish(o_all.reshape(b, h, nc * c, dve)[:, :, pad:], normalize, out_dtype)
    return (out, final) if return_state else out


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
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None, normalize: bool
) -> torch.Tensor:
    """The zero state for a sequence about to start (shapes from one token's features)."""
    heads = qf.shape[1] if decay is not None else kf.shape[1]
    return torch.zeros(
        qf.shape[0], heads, qf.shape[-1], v.shape[-1] + int(normalize),
        dtype=accumulation_dtype(qf.dtype), device=qf.device,
    )


def step(
    state: torch.Tensor,
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
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
