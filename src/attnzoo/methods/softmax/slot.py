"""S10 — slot attention: softmax over the queries (slots compete for each input), then a weighted mean over the keys.

Paper: "Object-Centric Learning with Slot Attention" (Locatello, Weissenborn, Unterthiner, Mahendran, Heigold,
Uszkoreit, Dosovitskiy, Kipf; NeurIPS 2020; arXiv:2006.15055), the core of SMTC, SlotCurri, Slot-MLLM, SLASH and
cycle-consistency object discovery. This file is the attention step of one iteration; ``attnzoo.nn.SlotAttention``
owns the slots, their Gaussian initialisation, the GRU update and the MLP (the paper's Algorithm 1).

Formula as implemented (queries ``q_i`` = the slots, keys/values = the inputs)::

    A_ij = softmax_i(scale · q_i · k_j + bias_ij)            over the queries i that see key j (not over the keys)
    W_ij = (A_ij + ε) / Σ_{j'} (A_ij' + ε)                   over the keys j that query i sees (the weighted mean)
    o_i  = Σ_j W_ij v_j

- The softmax normalises each key's column over the slots, so slots compete to explain each input; ε (``eps``,
  the paper's 1e-8) keeps a slot that wins no input from dividing by zero, and is added to the visible pairs only,
  so a masked key (padding) weighs exactly 0 and a row that sees no key gives 0.
- ``mask`` hides (slot, input) pairs from both normalisations (a padding mask is ``(B, 1, 1, N)``). Patterns: noncausal
  only (self and cross; slots are usually fewer than inputs).
- GQA: query heads share their key head; the softmax over queries runs per query head.

Reference (:func:`reference`): the literal steps — the dense logits, the softmax over the query axis, ``+ ε``, the
weights divided by their row sums, then ``@ v``.
Fast path ``torch`` (:func:`torch_grouped`): the same logits with the query heads of a key head stacked against it
(no repeated keys or values), and the weighted mean taken after the matmul: ``o_i = (Σ_j (A_ij + ε) v_j) / Σ_j (A_ij +
ε)`` divides ``Sq × Dv`` numbers instead of the ``Sq × N`` weights. Same memory order (the ``Sq × N`` logits, small:
Sq is the number of slots).
"""

from __future__ import annotations

import torch

from attnzoo.kernels.dense import safe_softmax
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, MethodSpec, Param, register

EPS = 1e-8

SPEC = MethodSpec(
    name="slot",
    family="softmax",
    mechanism="S10",
    paper="Object-Centric Learning with Slot Attention",
    arxiv="2006.15055",
    summary="A = softmax over the queries (slots) of scale·q·k, o_i = Σ_j (A_ij + ε) v_j / Σ_j (A_ij + ε): slots "
    "compete for inputs, then each takes the weighted mean of what it won",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(Param("eps", (float,), EPS, "ε added to each visible weight before the weighted mean", low=0.0),),
    complexity="O(Sq·N·d) time, O(Sq·N) memory (Sq slots)",
)


def _over_queries(s: torch.Tensor, seen: torch.Tensor, eps: float) -> torch.Tensor:
    """``softmax`` of ``s (..., Sq, N)`` over the query axis among ``seen``, plus ``eps`` on the seen pairs."""
    a = safe_softmax(s.transpose(-1, -2), seen.transpose(-1, -2)).transpose(-1, -2)
    return a + eps * seen.to(a.dtype)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for ``den (..., 1)``, 0 where ``den`` is 0 (a row that sees nothing), with finite gradients."""
    positive = den > 0
    return (num / torch.where(positive, den, torch.ones_like(den))).masked_fill(~positive, 0.0)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    a = _over_queries(s, visible(causal, mask, q, k), eps)
    weights = _safe_divide(a, a.sum(-1, keepdim=True))
    return weights @ repeat_kv(v, q.shape[1])


def torch_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    b, h, sq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    s = (scale * q.reshape(b, hkv, g * sq, d) @ k.transpose(-1, -2)).view(b, hkv, g, sq, n)
    if bias is not None:
        s = s + bias.expand(b, h, sq, n).reshape(b, hkv, g, sq, n)
    seen = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand(b, h, sq, n).reshape(s.shape)
    a = _over_queries(s, seen, eps).reshape(b, hkv, g * sq, n)
    out = _safe_divide(a @ v, a.sum(-1, keepdim=True))
    return out.reshape(b, h, sq, -1)


register(SPEC, reference, [Backend("torch", torch_grouped)])
