"""S4 — momentum attention.

Paper: "Momentum Attention: The Physics of In-Context Learning and Spectral Forensics for Mechanistic
Interpretability" (K. Maitra, arXiv:2602.04902).

Formula as implemented: the kinematic difference ``p_t = x_t − x_{t−1}`` and the symplectic shear
``x̂_t = x_t + γ p_t = (1 + γ) x_t − γ x_{t−1}`` are applied to the queries and to the keys (values are left
unchanged, as in the paper), then ``O = softmax(scale · Q̂ K̂ᵀ + bias + M) V`` as in S1.

Choices:
- Boundary: at ``t = 0`` there is no previous token; we take ``x_{−1} = x_0`` (zero velocity), so the first query and
  key are left unchanged. (Zero-padding, ``x_{−1} = 0``, would instead scale the first token by ``1 + γ``.)
- ``gamma`` defaults to 0.5 (our choice; the paper tunes γ and reports γ* ≈ 4.17·N^−0.74 on associative recall).
  ``gamma = 0`` is exactly softmax attention.
- Patterns: self-attention only. The shear differences each sequence along its own time axis; in cross-attention
  (``seq_q != seq_kv``, e.g. a decode chunk over a KV cache) the first query's predecessor is not part of the call,
  so the shift would silently use the wrong boundary. The call is refused rather than answered wrongly.

Fast path ``sdpa`` (:func:`sdpa_sheared`): the shear is one fused elementwise op per tensor (O(N·d)), then S1's SDPA
path, :func:`attnzoo.kernels.dense.sdpa_attention` (GQA without copies; flash/efficient kernels where available). The
reference builds the shear as an explicit ``(N, N)`` matrix applied to Q and K and then materialises every score.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's visible (original) keys, so the row
log-sum-exp of the sheared logits is returned; the fast path then runs :func:`attnzoo.kernels.dense.attention_lse` on
the sheared Q and K.

Decoding (:data:`DECODER`): the cache holds the *sheared* keys and the values; the shear of a new token needs its
predecessor, so ``cache.extras`` keeps each sequence's previous raw query and key (``previous_q (B, H, 1, D)``,
``previous_k (B, Hkv, 1, D)``; ragged prompts: each sequence's own last token). :func:`decode_prefill` runs
:func:`sdpa_sheared` over the prompt; :func:`decode_step` shears the token with the stored predecessor (a sequence
with no token yet uses the token itself, the ``x_{−1} = x_0`` boundary), appends, and attends with
:func:`attnzoo.kv.attend.softmax_attention` (SDPA over the cache).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"gamma": float(torch.rand((), generator=generator)) * 1.5 - 0.25}


SPEC = MethodSpec(
    name="momentum",
    family="softmax",
    mechanism="S4",
    paper="Momentum Attention: The Physics of In-Context Learning and Spectral Forensics for Mechanistic "
    "Interpretability",
    arxiv="2602.04902",
    summary="softmax attention on sheared q/k: x_t ← x_t + γ(x_t − x_{t−1}); x_{−1} = x_0",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(Param("gamma", (float,), 0.5, "momentum coefficient γ of the shear x_t + γ(x_t − x_{t−1}); 0 = softmax"),),
    complexity="O(N²d) time; memory of the SDPA kernel plus O(N·d) for the sheared q/k",
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def _shear_matrix(n: int, gamma: float, like: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix ``(1 + γ) I − γ P`` where row ``t`` of ``P`` picks token ``t − 1`` (row 0 picks 0)."""
    previous = torch.zeros(n, n, dtype=like.dtype, device=like.device)
    for t in range(n):
        previous[t, max(t - 1, 0)] = 1.0
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return (1.0 + gamma) * eye - gamma * previous


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, gamma: float, return_lse: bool = False,
) -> Output:
    shear = _shear_matrix(q.shape[2], gamma, q)
    s = dense_scores(shear @ q, shear @ k, scale)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, q.shape[1]), return_lse)


def _shear(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x_t + γ(x_t − x_{t−1})`` along dim 2, ``x_{−1} = x_0``."""
    previous = torch.cat((x[:, :, :1], x[:, :, :-1]), dim=2)
    return torch.lerp(x, previous, -gamma)  # x + (−γ)(previous − x) = x + γ(x − previous)


def sdpa_sheared(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, gamma: float, return_lse: bool = False,
) -> Output:
    attend = attention_lse if return_lse else sdpa_attention
    return attend(_shear(q, gamma), _shear(k, gamma), v, causal=causal, scale=scale, mask=mask, bias=bias)


def _last_tokens(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's last real token ``(B, H, 1, D)`` (its first, ``x_0``, if it has none yet: never read)."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1, 1).expand(-1, x.shape[1], 1, x.shape[3])
    return x.gather(2, index)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, gamma: float,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal momentum attention over a (right-padded) prompt; the cache of its sheared keys, values and last tokens."""
    out = sdpa_sheared(q, k, v, causal=True, scale=scale, mask=None, bias=None, gamma=gamma)
    cache = KVCache.from_prompt(_shear(k, gamma), v, lengths)
    extras = {"previous_q": _last_tokens(q, cache.length), "previous_k": _last_tokens(k, cache.length)}
    return out, replace(cache, extras={**cache.extras, **extras})


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, gamma: float,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: shear it with the stored predecessor, append, attend."""
    first = (cache.length == 0).view(-1, 1, 1, 1)
    previous_q = torch.where(first, q, cache.extras["previous_q"])
    previous_k = torch.where(first, k, cache.extras["previous_k"])
    cache = cache.append(torch.lerp(k, previous_k, -gamma), v)
    out = softmax_attention(cache, torch.lerp(q, previous_q, -gamma), scale)
    return out, replace(cache, extras={**cache.extras, "previous_q": q, "previous_k": k})


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("sdpa", sdpa_sheared, lse=True)], DECODER)
