"""L6 — RALA: rank-augmented linear attention.

Paper: "Breaking the Low-Rank Dilemma of Linear Attention" (Fan et al., arXiv:2411.07635); the formula follows the
authors' public code (qhfan/RALA, ``GateLinearAttentionNoSilu``).

Formula as implemented (noncausal; self or cross lengths), ``φ(x) = elu(x) + 1``, ``N = Skv``::

    q̄     = mean_i φ(q_i)                                       (per head)
    α_j   = softmax_j(scale · q̄·φ(k_j))                          KV-buffer rank augmentation: reweighted keys
    k̃_j   = N · α_j · φ(k_j)
    o_i   = Σ_j (φ(q_i)·k̃_j) v_j / Σ_j φ(q_i)·k̃_j               (a row whose normaliser is 0 gives 0)
    out_i = o_i ⊙ output_gate_i                                  output rank augmentation (when a gate is given)

The paper multiplies the output element-wise by a linear projection of the layer input (``output_gate``, a tensor
broadcastable to ``(B, H, Sq, Dv)``; None: no gate). Choices: the authors' code adds 1e-6 to the normaliser; here the
normaliser is exactly ``Σ_j φ(q_i)·k̃_j`` (positive for elu+1 features) with the library's safe division. RoPE on
``φ(q)``, ``k̃`` and the depthwise-convolution positional term (LePE) are layer-level and not part of this function.
Causal use is not defined (``q̄`` averages every query), so only noncausal patterns are offered.

Layer: ``attnzoo.nn.Attention(..., method="rala")`` computes ``output_gate`` from the token as the paper's layer does
(:mod:`attnzoo.nn.layers.rala`); ``faithful=False`` gives the bare kernel, to which a gate may be passed.

Fast path ``torch`` (:func:`torch_factored`): ``φ(Q) (K̃ᵀ [V, 1])`` via :func:`attnzoo.kernels.linear_scan.noncausal`,
O(N·D·Dv) time and O(N) memory. GQA: each query head has its own ``α``, so the reweighted keys (and the values) are laid
out per query head (a G-fold copy of K and V).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import linear_scan
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.methods.common import repeat_kv
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, MethodSpec, Param, register


def _gate_check(value: Any, call: Call) -> str | None:
    shape = (call.batch, call.heads, call.seq_q, call.head_dim_v)
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        ok = False
    return None if ok else f"a tensor broadcastable to {shape}"


SPEC = MethodSpec(
    name="rala",
    family="linear",
    mechanism="L6",
    paper="Breaking the Low-Rank Dilemma of Linear Attention",
    arxiv="2411.07635",
    summary="elu+1 linear attention with keys reweighted by softmax(q̄·k) (KV-buffer rank augmentation), output gate",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param("output_gate", (torch.Tensor,), None, "element-wise output gate, broadcastable to (B, H, Sq, Dv)",
              check=_gate_check),
    ),
    complexity="O(N·D·Dv) time, O(N) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, output_gate: torch.Tensor | None,
) -> torch.Tensor:
    h, n = q.shape[1], k.shape[2]
    phi_q = F.elu(q) + 1
    phi_k = F.elu(repeat_kv(k, h)) + 1
    q_bar = phi_q.mean(dim=2, keepdim=True)  # (B, H, 1, D)
    alpha = torch.softmax(scale * q_bar @ phi_k.transpose(-1, -2), dim=-1)  # (B, H, 1, Skv)
    a = phi_q @ (phi_k * (n * alpha.transpose(-1, -2))).transpose(-1, -2)  # (B, H, Sq, Skv)
    den = a.sum(dim=-1, keepdim=True)
    o = torch.where(den > 0, (a @ repeat_kv(v, h)) / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
    return o if output_gate is None else o * output_gate


def torch_factored(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, output_gate: torch.Tensor | None,
) -> torch.Tensor:
    b, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    acc = linear_scan.accumulation_dtype(q.dtype)
    phi_q = F.elu(q.to(acc)).add_(1.0)
    phi_k = F.elu(k.to(acc)).add_(1.0)
    q_bar = phi_q.mean(dim=2, keepdim=True).contiguous()
    alpha = torch.softmax(grouped_logits(q_bar, phi_k, scale), dim=-1)  # (B, H, 1, Skv)
    weights = (n * alpha).view(b, hkv, h // hkv, n, 1)
    k_tilde = (phi_k[:, :, None] * weights).reshape(b, h, n, d)
    out = linear_scan.noncausal(phi_q, k_tilde, repeat_kv(v.to(acc), h), normalize=True).to(v.dtype)
    return out if output_gate is None else out * output_gate


register(SPEC, reference, [Backend("torch", torch_factored)])
