"""L5 — NaLaFormer: norm-aware linear attention; parallel, chunked and recurrent forms.

Paper: "NaLaFormer: Norm-Aware Linear Attention for Transformer Models" (Meng et al., arXiv:2506.21137; later titled
"Norm×Direction: Restoring the Missing Query Norm in Vision Linear Attention"). The formula follows the authors'
public PyTorch code (``NormAwareLinearAttn``): each vector is split into norm and direction; the query norm sets the
power of a spiky map of the query direction (restoring the norm → entropy link that the normaliser of linear
attention cancels), and a sign split (``relu(x)``, ``relu(−x)``) keeps negative components as separate non-negative
features, so only same-sign components interact (the paper's "cosine inhibit" of opposite directions).

Feature maps as implemented (per head, ``D`` → ``2D`` non-negative features; ``α = alpha``, ``r = key_power``)::

    p(q)  = α · (0.5 + tanh(‖q‖))                                query-norm-aware power, in [α/2, 3α/2)
    φ_q(q) = [ (relu(q)/‖q‖)^p(q) , (relu(−q)/‖q‖)^p(q) ]        direction of q, sharpened by its own norm
    φ_k(k) = [ relu(k^r) , relu(−k^r) ]                          r odd (default 3: the authors' k³)

Attention (causal ``j ≤ i`` or noncausal; cross lengths allowed noncausally)::

    o_i = Σ_j (φ_q(q_i)·φ_k(k_j)) v_j / Σ_j φ_q(q_i)·φ_k(k_j)     (a row whose normaliser is 0 gives 0)

Choices: ``scale`` is not used (the map acts on the raw query, as in the authors' code, where the ``N^{-1/2}`` factors
on keys and values cancel against the mean in the normaliser); the authors' ``+1e-6`` in the normaliser is replaced
by the library's exact safe division; the RoPE the authors apply to the numerator features, the depthwise-convolution
positional term (LePE) and the output gate are layer-level and not part of this function. A zero query has no
direction: its features are 0 and its row gives 0. Causal use restricts every sum to ``j ≤ i`` (the paper is about
vision, noncausal); the features of a token depend only on that token, so the recurrent form is exact. Features are
computed in fp32 for half-precision inputs (``k^r`` would overflow fp16).

Layer: ``attnzoo.nn.Attention(..., method="nala")`` builds the paper's output LayerNorm and SiLU gate around this
kernel (:mod:`attnzoo.nn.layers.nala`); ``faithful=False`` gives the bare kernel.

Fast path ``torch`` (:func:`torch_chunked`): :mod:`attnzoo.kernels.linear_scan` (chunked causal scan, or
``φ_q(Q)(φ_k(K)ᵀ[V, 1])`` noncausally), O(N·D·Dv) time and O(N) memory. Causally the two maps run inside the scan one
chunk group at a time (and are recomputed in its backward), so the ``2D``-wide features never exist for the whole
sequence. Recurrent form: :func:`prefill` and :func:`step` (see :mod:`attnzoo.methods.linear.common`), state
``(B, Hkv, 2D, Dv + 1)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnzoo.kernels import linear_scan
from attnzoo.methods.common import repeat_kv, visible
from attnzoo.methods.linear.common import feature_prefill, feature_step
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, register

PATTERNS = frozenset({"self/causal", "self/noncausal", "cross/noncausal"})


def _odd(value: Any, call: Call) -> str | None:
    return None if value % 2 == 1 else "an odd integer (an even power loses the sign of k)"


SPEC = MethodSpec(
    name="nala",
    family="linear",
    mechanism="L5",
    paper="NaLaFormer: Norm-Aware Linear Attention for Transformer Models",
    arxiv="2506.21137",
    summary="linear attention with a query-norm-aware power map of the query direction and sign-split features",
    exact=True,
    patterns=PATTERNS,
    params=(
        Param("alpha", (float,), 3.0, "power scale: p(q) = alpha·(0.5 + tanh‖q‖)", low=0.0, low_open=True),
        Param("key_power", (int,), 3, "odd elementwise power of the keys before the sign split", low=1, check=_odd),
        Param("chunk_size", (int,), 128, "tokens per chunk of the causal chunked scan", low=1),
    ),
    complexity="O(N·D·Dv) time, O(N) memory; decoding O(D·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


def query_features(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``φ_q(q)``: ``2D`` non-negative features per token, in the scans' accumulation dtype."""
    q = q.to(linear_scan.accumulation_dtype(q.dtype))
    norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    power = alpha * (0.5 + torch.tanh(norm))
    direction = q / norm.clamp_min(torch.finfo(q.dtype).tiny)
    # one of relu(d), relu(−d) is 0 for every component: raise |d| to the power once, then split by sign
    spiky = direction.abs().pow(power)
    zero = spiky.new_zeros(())
    return torch.cat([torch.where(direction > 0, spiky, zero), torch.where(direction < 0, spiky, zero)], dim=-1)


def key_features(k: torch.Tensor, key_power: int) -> torch.Tensor:
    """``φ_k(k)``: ``2D`` non-negative features per token, in the scans' accumulation dtype."""
    kp = k.to(linear_scan.accumulation_dtype(k.dtype)).pow(key_power)
    return torch.cat([torch.relu(kp), torch.relu(-kp)], dim=-1)


def features(q: torch.Tensor, k: torch.Tensor, alpha: float, key_power: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(φ_q(q), φ_k(k))``."""
    return query_features(q, alpha), key_features(k, key_power)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, alpha: float, key_power: int, chunk_size: int,
) -> torch.Tensor:
    qf, kf = features(q, k, alpha, key_power)
    a = (qf @ repeat_kv(kf, q.shape[1]).transpose(-1, -2)) * visible(causal, None, q, k)
    den = a.sum(dim=-1, keepdim=True)
    o = a @ repeat_kv(v, q.shape[1]).to(a.dtype)
    o = torch.where(den > 0, o / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(o))
    return o.to(v.dtype)


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, alpha: float, key_power: int, chunk_size: int,
) -> torch.Tensor:
    if causal:  # the maps run per chunk group inside the scan: the 2D-wide features never span the sequence
        maps = (functools.partial(query_features, alpha=alpha), functools.partial(key_features, key_power=key_power))
        return linear_scan.causal(q, k, v, chunk=chunk_size, normalize=True, features=maps)
    qf, kf = features(q, k, alpha, key_power)
    return linear_scan.noncausal(qf, kf, v, normalize=True)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters ``p``), returning the scan's state."""
    qf, kf = features(q, k, p["alpha"], p["key_power"])
    return feature_prefill(qf, kf, v, chunk_size=p["chunk_size"], normalize=True)


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)``; ``state=None`` starts a new sequence."""
    qf, kf = features(q, k, p["alpha"], p["key_power"])
    return feature_step(state, qf, kf, v, normalize=True)


DECODER = Decoder(decode_prefill, decode_step)


register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
