"""S5 — energy-gated attention (EGA).

Paper: "Energy-Gated Attention: Spectral Salience as an Inductive Bias for Transformer Attention" (Athanasios Zeris,
2026; arXiv:2605.21842). Official code: github.com/AthanasiosZeris/energy-gated-attention (``paper1_ega/``, the
``EGA-1`` model, ``LinearEnergyGatedAttention``); the formula below is read from that code and its README, since the
abstract gives none.

Each key gets a scalar salience from one learned linear projection; a sigmoid of its z-score against a learned
threshold gates the key, and each attention row is renormalised over the gated keys:

    e_j = u_g · k_j                                     (energy of key j; one vector u per kv head g)
    z_j = (e_j − mean(e)) / max(std(e), 1e-8)           (z-score over the keys; population std)
    g_j = σ(α_g (z_j − τ_g))                            (the gate, in (0, 1))
    O_i = Σ_j a_ij g_j v_j / Σ_j a_ij g_j,   a_ij = softmax_j(scale · q_i·k_j + bias_ij + M_ij)
        = Σ_j softmax_j(scale · q_i·k_j + bias_ij + log g_j + M_ij) v_j

- The renormalisation is the paper's (``att = att * gate; att = att / att.sum(-1)``): EGA is softmax attention with
  the per-key additive term ``log g_j``. A gate that is the same for every key (``sharpness = 0``, or keys of equal
  energy) gives softmax attention exactly.
- Causal patterns — our choice: the paper z-scores each energy against the whole sequence, so under a causal mask
  the gate of key ``j``, hence every output, would depend on later keys. Here a causal call z-scores key ``j``
  against keys ``0..j`` only (running mean and variance), so a key's gate is fixed once it is seen (decoding keeps
  it) and no output depends on a later key. Non-causal calls use the whole key sequence, as the paper does; a key
  sequence of one key gets ``z = 0`` (the paper's ``T == 1`` case). A user mask hides keys from queries but does not
  change the statistics: the gate is a property of the key, not of the query.
- The energy is read from the key ``k_j`` (the abstract's "energy of key token embeddings"; a functional core sees
  only q, k, v). The paper's code projects the layer input ``x_j`` with a bias; since ``k_j = W_k x_j``, ``u·k_j`` is
  that projection restricted to the row space of ``W_k``, and the bias cancels in the z-score. One gate per kv head
  (the paper's model is multi-head, one per head): under GQA the query heads of a group share it.
- Parameters (``az.nn.Attention`` owns them as learnable tensors): ``energy_proj`` u ``(kv_heads, head_dim)``,
  initialised N(0, 0.02²) like the paper's projection (the z-score makes only its direction matter);
  ``threshold`` τ (float, or ``(kv_heads,)``), init 0 as in the paper's EGA-1 run (it reports τ converging to about
  0.35, i.e. P(z > τ) ≈ 36 % of the tokens); ``sharpness`` α (float >= 0, or ``(kv_heads,)``), init 2.0, learned
  as in the paper. A learned tensor's values are not range-checked (that would read them back on every call).
  ``energy_proj = None`` (a plain call's default) turns the gate off: softmax attention.
- The statistics are computed in at least fp32 (the 1e-8 floor on the std underflows in fp16).

Fast path ``sdpa`` (:func:`sdpa_gated`): the gate is one additive logit per key, so it rides in an extra head-dim
column: ``q' = [q, 1]``, ``k' = [k, log g / scale]``, ``v' = [v, 0]``, zero-padded to equal widths (which keeps
PyTorch's CPU flash kernel; on CUDA to a multiple of 8, which its flash kernel needs — not measured here), then one
:func:`attnzoo.kernels.dense.sdpa_attention` call (bottom-right causal, masks, bias, GQA without copies); gradients
reach u, τ and α through autograd. The cost over SDPA is that of head dim D+1 instead of D plus O(N·d) copies: see
the ``energy_gated_n4096_*`` cases of ``attnzoo bench --suite softmax`` and docs/s-layers.md. The reference instead
adds ``log g_j`` to every materialised logit, and computes the causal statistics of each key from its prefix directly
(the fast path uses running sums).

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's visible keys, so the row log-sum-exp of
``scale · q·k + bias + log g`` is returned (:func:`attnzoo.kernels.dense.attention_lse` on the same widened q, k, v).

Decoding (:data:`DECODER`): the causal gates depend only on earlier keys, so the cache keeps each slot's ``log g`` as
its ``log_weight`` (added to the slot's scores by :func:`attnzoo.kv.attend.softmax_attention`) and, in its
``extras``, each sequence's running energy statistics (sums of ``e − e_0`` and of its square, about the first
token's energy ``e_0``); a step z-scores its tokens against them, appends, and attends. Chunks of tokens step at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache, check_lengths
from attnzoo.methods.checks import tensor_shape
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

STD_FLOOR = 1e-8  # the paper's floor on the standard deviation of the energies
THRESHOLD_INIT = 0.0
SHARPNESS_INIT = 2.0
ENERGY_INIT_STD = 0.02

# the cache's extras: each sequence's first energy and the running sums of (e − e_0) and (e − e_0)² per kv head
SHIFT, SUM, SUMSQ = "energy_shift", "energy_sum", "energy_sumsq"

Scalar = float | torch.Tensor


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    u = torch.randn(call.kv_heads, call.head_dim, generator=generator, dtype=torch.float64)
    tau, alpha = torch.randn(2, call.kv_heads, generator=generator, dtype=torch.float64)
    return {"energy_proj": u.to(call.dtype), "threshold": (0.35 + 0.3 * tau).to(call.dtype),
            "sharpness": (2.0 + 0.5 * alpha.abs()).to(call.dtype)}


SPEC = MethodSpec(
    name="energy_gated",
    family="softmax",
    mechanism="S5",
    paper="Energy-Gated Attention: Spectral Salience as an Inductive Bias for Transformer Attention",
    arxiv="2605.21842",
    summary="softmax whose keys are gated by σ(α(z − τ)), z the z-scored energy u·k of the key (prefix statistics "
    "when causal); rows renormalised",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param(
            "energy_proj", (torch.Tensor,), None, "u (kv_heads, head_dim): the key energy e = u·k; None: no gate",
            check=tensor_shape(lambda c: (c.kv_heads, c.head_dim), "kv_heads, head_dim", floats_pass=True),
            init=lambda layer: ENERGY_INIT_STD * torch.randn(layer.kv_heads, layer.head_dim),
        ),
        Param(
            "threshold", (float, torch.Tensor), THRESHOLD_INIT, "τ (float or (kv_heads,)): the gate's threshold on z",
            check=tensor_shape(lambda c: (c.kv_heads,), "kv_heads", floats_pass=True),
            init=lambda layer: torch.full((layer.kv_heads,), THRESHOLD_INIT),
        ),
        Param(
            "sharpness", (float, torch.Tensor), SHARPNESS_INIT, "α (float >= 0 or (kv_heads,)): the gate's slope",
            low=0.0, check=tensor_shape(lambda c: (c.kv_heads,), "kv_heads", floats_pass=True),
            init=lambda layer: torch.full((layer.kv_heads,), SHARPNESS_INIT),
        ),
    ),
    complexity="O(N²d) time; memory of the SDPA kernel plus O(N·d) for the widened q/k/v",
    tests=TestHints(sample_params=_sample),
    lse=True,
)


# -- the gate ---------------------------------------------------------------------------------------------------------
def _energies(k: torch.Tensor, energy_proj: torch.Tensor) -> torch.Tensor:
    """``e = u_g · k_j`` as ``(B, Hkv, S)``, in at least fp32."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    return torch.einsum("bgsd,gd->bgs", k.to(dtype), energy_proj.to(dtype))


def _per_head(x: Scalar, like: torch.Tensor) -> Scalar:
    """A float, or a ``(Hkv,)`` tensor as ``(1, Hkv, 1)`` in ``like``'s dtype."""
    return x.to(like.dtype).view(1, -1, 1) if isinstance(x, torch.Tensor) else x


def _log_gates(z: torch.Tensor, threshold: Scalar, sharpness: Scalar) -> torch.Tensor:
    """``log g = log σ(α (z − τ))`` (never underflows, unlike ``g``)."""
    return F.logsigmoid(_per_head(sharpness, z) * (z - _per_head(threshold, z)))


def zscores(e: torch.Tensor) -> torch.Tensor:
    """Energies ``e (..., n)`` z-scored against all ``n``: two passes (mean, then population variance)."""
    d = e - e.mean(-1, keepdim=True)
    return d / (d * d).mean(-1, keepdim=True).clamp(min=STD_FLOOR**2).sqrt()


def _running_zscores(
    e: torch.Tensor, shift: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal z-scores of energies ``e (B, Hkv, T)`` that continue sequences of ``count (B,)`` earlier energies.

    The earlier ones are summarised about ``shift (B, Hkv)`` (the sequence's first energy; a sequence with no earlier
    energy takes its first new one) by ``s1 = Σ (e − shift)`` and ``s2 = Σ (e − shift)²``. Energy ``t`` is scored
    against the mean and population std of every energy up to and including itself. Returns the z-scores and the
    shift and running sums after each energy, ``(B, Hkv, T)`` (the shift ``(B, Hkv)``).
    """
    shift = torch.where(count.view(-1, 1) > 0, shift, e[..., 0])
    d = e - shift.unsqueeze(-1)
    c1 = s1.unsqueeze(-1) + d.cumsum(-1)
    c2 = s2.unsqueeze(-1) + (d * d).cumsum(-1)
    n = count.view(-1, 1, 1) + torch.arange(1, e.shape[-1] + 1, device=e.device)
    mean = c1 / n
    var = (c2 / n - mean * mean).clamp(min=STD_FLOOR**2)
    return (d - mean) / var.sqrt(), shift, c1, c2


def _prefix_zscores(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_running_zscores` of sequences that start with the energies ``e (B, Hkv, S)``."""
    zeros = e.new_zeros(e.shape[:2])
    return _running_zscores(e, zeros, zeros, zeros, torch.zeros(e.shape[0], dtype=torch.long, device=e.device))


def log_gates(
    k: torch.Tensor, energy_proj: torch.Tensor, threshold: Scalar, sharpness: Scalar, causal: bool,
) -> torch.Tensor:
    """Each key's ``log g`` ``(B, Hkv, S)``: z-scored over the prefix (``causal``) or the whole key sequence."""
    e = _energies(k, energy_proj)
    return _log_gates(_prefix_zscores(e)[0] if causal else zscores(e), threshold, sharpness)


# -- reference --------------------------------------------------------------------------------------------------------
def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, energy_proj: torch.Tensor | None, threshold: Scalar, sharpness: Scalar,
    return_lse: bool = False,
) -> Output:
    h, skv = q.shape[1], k.shape[2]
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    if energy_proj is not None:
        e = torch.einsum("bgsd,gd->bgs", k, energy_proj.to(k.dtype))
        # causal: key j against keys 0..j, one prefix at a time
        z = torch.stack([zscores(e[..., : j + 1])[..., -1] for j in range(skv)], dim=-1) if causal else zscores(e)
        alpha, tau = (_per_head(x, e) for x in (sharpness, threshold))
        gate = torch.sigmoid(alpha * (z - tau))
        s = s + torch.log(repeat_kv(gate.unsqueeze(-2), h)).to(s.dtype)
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, h), return_lse)


# -- fast path --------------------------------------------------------------------------------------------------------
def _widen(t: torch.Tensor, width: int, column: torch.Tensor | None = None) -> torch.Tensor:
    """``t (..., D)`` zero-padded to ``width``, with ``column (...)`` (broadcast) as its column ``D`` if given."""
    parts = [t] if column is None else [t, column.to(t.dtype).expand(*t.shape[:-1]).unsqueeze(-1)]
    used = t.shape[-1] + len(parts) - 1
    if width > used:
        parts.append(t.new_zeros(*t.shape[:-1], width - used))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else t


def sdpa_gated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, energy_proj: torch.Tensor | None, threshold: Scalar, sharpness: Scalar,
    return_lse: bool = False,
) -> Output:
    if energy_proj is None:
        attend = attention_lse if return_lse else sdpa_attention
        return attend(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias)
    log_gate = log_gates(k, energy_proj, threshold, sharpness, causal)
    return gated_attention(q, k, v, log_gate, causal=causal, scale=scale, mask=mask, bias=bias, return_lse=return_lse)


def gated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, *, causal: bool, scale: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    """``softmax(scale · q·k + bias + log g + M) v`` for per-key ``log_gate (B, Hkv, S)``: one SDPA call on q, k, v
    widened by the gate's column."""
    dv = v.shape[-1]
    width = max(q.shape[-1] + 1, dv)
    if q.device.type == "cuda":  # the CUDA flash kernel takes head dims that are multiples of 8
        width = -(-width // 8) * 8
    attend = attention_lse if return_lse else sdpa_attention
    got = attend(_widen(q, width, q.new_ones(())), _widen(k, width, log_gate / scale), _widen(v, width),
                 causal=causal, scale=scale, mask=mask, bias=bias)
    if return_lse:
        return got[0][..., :dv], got[1]
    return got[..., :dv]


# -- decoding ---------------------------------------------------------------------------------------------------------
def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, energy_proj: torch.Tensor | None,
    threshold: Scalar, sharpness: Scalar, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal EGA over a (right-padded) prompt, and the cache of its keys, values, gates and energy statistics."""
    cache = KVCache.from_prompt(k, v, lengths)
    if energy_proj is None:
        return sdpa_attention(q, k, v, causal=True, scale=scale, mask=None, bias=None), cache
    b, hkv, s, _ = k.shape
    z, shift, c1, c2 = _prefix_zscores(_energies(k, energy_proj))
    log_gate = _log_gates(z, threshold, sharpness)
    out = gated_attention(q, k, v, log_gate, causal=True, scale=scale, mask=None, bias=None)
    last = (check_lengths(lengths, b, s, k.device) - 1).clamp(min=0).view(b, 1, 1).expand(b, hkv, 1)
    seen = cache.length.view(b, 1) > 0  # an empty prompt leaves empty sums

    def at_last(t: torch.Tensor) -> torch.Tensor:
        return torch.where(seen, t.gather(2, last).squeeze(2), 0.0)

    extras = {**cache.extras, SHIFT: shift, SUM: at_last(c1), SUMSQ: at_last(c2)}
    return out, replace(cache, log_weight=log_gate.to(k.dtype), extras=extras)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    energy_proj: torch.Tensor | None, threshold: Scalar, sharpness: Scalar,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: z-score their energies against the running statistics, append them with their
    gates as slot log-weights, attend over the cache."""
    if energy_proj is None:
        cache = cache.append(k, v)
        return softmax_attention(cache, q, scale), cache
    ex, t = cache.extras, k.shape[2]
    z, shift, c1, c2 = _running_zscores(_energies(k, energy_proj), ex[SHIFT], ex[SUM], ex[SUMSQ], cache.length)
    log_gate = _log_gates(z, threshold, sharpness).to(k.dtype)
    cache = cache.append(k, v)
    assert cache.log_weight is not None  # the prefill set it
    cache = replace(cache, log_weight=torch.cat([cache.log_weight[..., :-t], log_gate], dim=-1),
                    extras={**ex, SHIFT: shift, SUM: c1[..., -1], SUMSQ: c2[..., -1]})
    return softmax_attention(cache, q, scale), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True, chunked=True)


register(SPEC, reference, [Backend("sdpa", sdpa_gated, lse=True)], DECODER)
