"""L8 — agent attention: a few agent tokens first gather from the keys, then broadcast to the queries.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., arXiv:2312.08874).

Formula as implemented (noncausal; self or cross lengths)::

    A   = agents, or AdaptiveAvgPool_seq(Q) to n = num_agents tokens           (B, H, n, D)
    V_A = softmax(scale · A Kᵀ + B_1) V                 agent aggregation       (B, H, n, Dv)
    O   = softmax(scale · Q Aᵀ + B_2) V_A               agent broadcast         (B, H, Sq, Dv)

i.e. ``O = σ(QAᵀ) σ(AKᵀ) V``, a generalised linear attention with ``n ≪ N``. ``B_1 = agent_bias`` (broadcastable to
``(B, H, n, Skv)``) and ``B_2 = query_bias`` (broadcastable to ``(B, H, Sq, n)``) are the optional agent biases; the
paper builds them from position embeddings, which is the layer's business. Choices: the paper pools the queries on
the 2-D image grid; on a 1-D sequence the pooling is adaptive average pooling over contiguous query groups (with
fewer queries than agents, queries are repeated). The depthwise convolution the paper adds to the output to restore
feature diversity is a layer-level module and is not part of this function. Default ``num_agents = 49`` (the paper's
DeiT setting, 7×7).

Reference: the dense ``(Sq × Skv)`` matrix ``σ(QAᵀ) σ(AKᵀ)`` times ``V``. Fast path ``torch`` (:func:`torch_factored`):
the associative order ``σ(QAᵀ)(σ(AKᵀ)V)``, O(N·n·D) time and O(N·n) memory; GQA by stacking each group's agents as rows
against its key head (no K/V copies). Softmaxes of half-precision inputs are computed in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels.blockwise import grouped_logits, grouped_pv
from attnzoo.kernels.linear_scan import accumulation_dtype
from attnzoo.methods.common import dense_scores, repeat_kv
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, MethodSpec, Param, register


def _agents_check(value: Any, call: Call) -> str | None:
    if value.dim() != 4 or (value.shape[0], value.shape[1], value.shape[3]) != (call.batch, call.heads, call.head_dim):
        return f"a tensor of shape ({call.batch}, {call.heads}, n, {call.head_dim})"
    return None


def _bias_check(rows: str) -> Any:
    def check(value: Any, call: Call) -> str | None:
        n = call.params["agents"].shape[2] if call.params.get("agents") is not None else call.params.get(
            "num_agents", 49
        )
        shape = (call.batch, call.heads, n, call.seq_kv) if rows == "agent" else (call.batch, call.heads, call.seq_q, n)
        try:
            ok = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            ok = False
        return None if ok else f"a float tensor broadcastable to {shape}"

    return check


SPEC = MethodSpec(
    name="agent",
    family="linear",
    mechanism="L8",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    summary="σ(QAᵀ)(σ(AKᵀ)V) with n agent tokens A pooled from Q (or given); optional agent biases",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param("num_agents", (int,), 49, "agent tokens n pooled from q (ignored when agents are given)", low=1),
        Param("agents", (torch.Tensor,), None, "(B, H, n, D) agent tokens; None: pooled from q", check=_agents_check),
        Param("agent_bias", (torch.Tensor,), None, "bias on agent→key logits, broadcastable to (B, H, n, Skv)",
              check=_bias_check("agent")),
        Param("query_bias", (torch.Tensor,), None, "bias on query→agent logits, broadcastable to (B, H, Sq, n)",
              check=_bias_check("query")),
    ),
    complexity="O(N·n·D) time, O(N·n) memory (n agents)",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


def pooled_agents(q: torch.Tensor, num_agents: int) -> torch.Tensor:
    """``(B, H, n, D)`` agents by adaptive average pooling of the queries along the sequence."""
    b, h, sq, d = q.shape
    pooled = F.adaptive_avg_pool1d(q.reshape(b * h, sq, d).transpose(1, 2), num_agents)
    return pooled.transpose(1, 2).reshape(b, h, num_agents, d)


def _softmax(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    return torch.softmax(x, dim=-1, dtype=accumulation_dtype(x.dtype))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, num_agents: int, agents: torch.Tensor | None, agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
) -> torch.Tensor:
    a = pooled_agents(q, num_agents) if agents is None else agents
    agent_weights = _softmax(dense_scores(a, k, scale), agent_bias)  # (B, H, n, Skv)
    query_weights = _softmax(scale * q @ a.transpose(-1, -2), query_bias)  # (B, H, Sq, n)
    dense = query_weights @ agent_weights  # (B, H, Sq, Skv): the quadratic form
    return (dense @ repeat_kv(v, q.shape[1]).to(dense.dtype)).to(v.dtype)


def torch_factored(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, num_agents: int, agents: torch.Tensor | None, agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
) -> torch.Tensor:
    a = (pooled_agents(q, num_agents) if agents is None else agents).contiguous()
    acc = accumulation_dtype(v.dtype)
    agent_weights = _softmax(grouped_logits(a, k, scale), agent_bias)
    agent_values = grouped_pv(agent_weights, v.to(acc))  # (B, H, n, Dv)
    query_weights = _softmax(torch.matmul(q, a.transpose(-1, -2)).mul_(scale), query_bias)
    return torch.matmul(query_weights, agent_values).to(v.dtype)


register(SPEC, reference, [Backend("torch", torch_factored)])
