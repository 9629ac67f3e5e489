"""S12 — Aaren: attention as an RNN, softmax attention of a query over every prefix by a parallel prefix scan.

Paper: "Attention as an RNN" (Feng, Tung, Hajimirsadeghi, Ahmed, Bengio, Mori; arXiv:2405.13956). Attention of one
query ``q`` over ``N`` tokens is a many-to-one RNN over the running triple ``(m, u, w)`` (max score, Σ exp, Σ exp·v);
its many-to-many outputs — attention of ``q`` over each prefix ``1..t`` — are a parallel prefix scan of that triple
with an associative combine. Aaren is the module whose query is a learned token rather than an input token:
``o_1..o_N = Aaren(q, x_1..x_N)``, trained in parallel like a Transformer and updated per token with constant memory
like an RNN.

Formula as implemented (causal self-attention only; ``scale`` defaults to ``1/√D``)::

    s_j = scale · q_j · k_j
    o_t = Σ_{j ≤ t, key_mask_j} exp(s_j) v_j / Σ_{j ≤ t, key_mask_j} exp(s_j)        (0 if no key is visible)

- Each key is scored by the query of its own position. Aaren's learned query is one vector per head, the same at
  every position (``attnzoo.nn.Aaren`` passes it as a stride-0 ``expand``, no copy), and then ``o_t`` is exactly the
  softmax attention of ``q`` over keys ``1..t`` — the cumulative softmax. Taking ``q`` per position keeps the
  library's ``(B, H, N, D)`` contract and lets any projection feed the query; the scan needs only that each score
  depends on its own position, not on ``t``.
- ``scale``: the library's convention (the paper writes ``s_j = q·k_j``; pass ``scale=1.0`` for it; a learned query
  absorbs either).
- ``key_mask`` ``(batch, seq)`` bool, False = a padding token never attended (left padding, ragged batches). A general
  ``(Sq, Skv)`` mask or bias cannot be scanned (it makes scores depend on ``t``), so the spec takes neither.
- GQA: query head ``h`` scores against key head ``h // (H / Hkv)``; values are broadcast, never repeated.

Reference (:func:`reference`): the cumulative softmax, dense — the ``(N × N)`` score matrix whose row ``t`` holds
``s_j`` for every ``j``, masked to ``j ≤ t``, through the shared dense softmax.

Fast path ``torch`` (:func:`torch_scan`): :func:`attnzoo.kernels.softmax_scan.prefix_attention`, the chunked scan of
the paper's ``(m, u, w)``: one pass over the sequence in cache-sized blocks of chunks of 16 positions — each chunk's
total, their exclusive scan continuing the state of what came before, then each position's output from one masked
``C×C`` matmul plus the carry's rank-one term. O(N·C·Dv) time, O(N·Dv) memory — linear in N. It returns the
log-sum-exp ``m_t + log u_t`` too (``return_lse=True``).

Decoding (:data:`DECODER`): the paper's RNN. The state is the triple of the whole sequence so far — ``m, u (B, H)``,
``w (B, H, Dv)``, constant in the sequence length (:class:`~attnzoo.kernels.softmax_scan.ScanState`);
:func:`decode_prefill` scans the prompt and keeps its last state, :func:`decode_step` scans the new tokens
continuing from it (one combine per token for a single one).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.softmax_scan import ScanState, prefix_attention
from attnzoo.methods.common import Output, repeat_kv, softmax_rows
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _check_key_mask(value: torch.Tensor, call: Call) -> str | None:
    if value.dtype != torch.bool:
        return "a bool tensor (True = attend)"
    want = (call.batch, call.seq_kv)
    if tuple(value.shape) != want:
        return f"a tensor of shape (batch, seq) = {want}"
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """A padding mask hiding about a fifth of the keys, the first key among them (so row 0 sees nothing)."""
    keep = torch.rand(call.batch, call.seq_kv, generator=generator) > 0.2
    keep[:, 0] = False
    return {"key_mask": keep.to(call.device)}


SPEC = MethodSpec(
    name="aaren",
    family="softmax",
    mechanism="S12",
    paper="Attention as an RNN",
    arxiv="2405.13956",
    summary="softmax attention of a query over every prefix, o_t = Σ_{j≤t} e^{s_j} v_j / Σ_{j≤t} e^{s_j}, "
    "s_j = scale·q_j·k_j; parallel prefix scan of (max, Σexp, Σexp·v), constant-state recurrent step",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("key_mask", (torch.Tensor,), None, "(batch, seq) bool: False = a padding key, never attended",
              check=_check_key_mask),
    ),
    complexity="O(N·C·Dv) time (chunk C = 16), O(N·Dv) memory; decoding O(Dv) per token, O(Dv) state",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def own_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q_j · k_j``, each position's query against its own key, as ``(B, Hkv, G, N)`` (G query heads per key
    head)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    return scale * torch.einsum("bkgnd,bknd->bkgn", q.reshape(b, hkv, h // hkv, n, d), k)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, key_mask: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    b, h, n, _ = q.shape
    s = scale * (q * repeat_kv(k, h)).sum(-1)  # s_j: each position's query against its own key
    s = s.view(b, h, 1, n).expand(b, h, n, n)  # row t holds every s_j
    seen = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().expand(b, h, n, n)
    if key_mask is not None:
        seen = seen & key_mask.view(b, 1, 1, n)
    return softmax_rows(s, seen, repeat_kv(v, h), return_lse)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None,
    initial: ScanState | None,
) -> tuple[torch.Tensor, torch.Tensor, ScanState]:
    """``out (B, H, N, Dv)`` in q's dtype, ``lse (B, H, N)`` and the whole sequence's state ``m, u (B, Hkv, G)``,
    ``w (B, Hkv, G, Dv)`` of the positions of ``q, k, v``, continuing from ``initial``."""
    s = own_scores(q, k, scale)
    if key_mask is not None:
        s = s.masked_fill(~key_mask.view(s.shape[0], 1, 1, -1), float("-inf"))
    out, lse, state = prefix_attention(s, v.unsqueeze(2), initial)
    b, h, n, _ = q.shape
    return out.reshape(b, h, n, -1).to(q.dtype), lse.reshape(b, h, n), state


def torch_scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, key_mask: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    out, lse, _ = _attend(q, k, v, scale, key_mask, None)
    return (out, lse) if return_lse else out


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, ScanState]:
    """Aaren over a prompt, and the constant-size state of the whole prompt: ``m, u (B, Hkv, G)``,
    ``w (B, Hkv, G, Dv)``."""
    out, _, state = _attend(q, k, v, scale, key_mask, None)
    return out, state


def decode_step(
    state: ScanState | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, ScanState]:
    """``T >= 1`` new tokens continuing from ``state`` (None: an empty sequence)."""
    out, _, state = _attend(q, k, v, scale, key_mask, state)
    return out, state


DECODER = Decoder(decode_prefill, decode_step, token_params=("key_mask",), chunked=True)


register(SPEC, reference, [Backend("torch", torch_scan, lse=True)], DECODER)
