"""Q2 — BinaryAttention: one-bit QK-attention (signs of queries and keys), a learnable bias, 8-bit P·V.

Paper: "BinaryAttention: One-Bit QK-Attention for Vision and Diffusion Transformers" (Xiao, Zhang, Zhang; CVPR 2026;
arXiv:2603.09582). Public code: github.com/EdwardChasel/BinaryAttention (DeiT-based; we follow its formulas, nothing
is copied).

Formula as implemented (:func:`reference`, per batch and head):

    Q̂ = α_Q · sign(Q),  α_Q = mean |Q| over the tokens and channels of the head      (same for K, per key head)
    S = scale · Q̂ K̂ᵀ + B_rel + bias,    P = softmax over the visible keys
    O = P V                      (pv_bits=None)
    O = P̂ V̂                     (pv_bits=8: P̂ = round(255·P) / 255, V̂ = 8-bit symmetric per channel)

- ``sign(0) = +1`` (the paper's ``binary_sign``), so every code is ±1.
- ``α`` is the paper's scaling: one number per (batch, head), the mean absolute value over the whole head (all
  tokens, the mask not consulted). Because it reads every token, a query's logits depend on later keys: the method
  is noncausal only (the paper's vision and diffusion transformers are), and patterns are ``self``/``cross``
  noncausal.
- The learnable bias ``B_rel``: the paper adds a relative-position bias table over the 2-D patch grid of its ViTs
  (plus entries for the class token). A functional core cannot know a grid, so ``rel_bias`` is its 1-D form, a table
  ``(heads, 2R + 1)`` indexed by the clipped offset ``clamp(j − i, −R, R) + R`` (``R = 64`` when ``nn.Attention``
  creates it, initialised like the paper's table: truncated normal, std 0.02). A 2-D table is the caller's to gather
  into the call's ``bias`` (any additive bias is accepted, and is differentiable).
- ``pv_bits=8`` is the paper's ``--pv-quant``: ``P`` in unsigned 8 bits with the static scale 1/255, ``V`` in signed
  8 bits with ``s = 127 / (max_tokens |V| + 1e-6)`` per channel and ``V̂ = round(V·s) / (s + 1e-6)`` (the released
  code's dequantisation, kept as it is). ``None`` (the default) keeps P·V in float: the one-bit QK attention of the
  title.
- Training is quantisation-aware, as in the paper: the reference is differentiable with straight-through estimators —
  ``sign`` passes gradients where ``|x| ≤ 1`` (:class:`SignSTE`), ``round`` passes them unchanged, ``V̂`` passes them
  where ``|V| < 2`` (the paper's clip values); ``α`` is differentiated normally. The paper then distils from the
  full-precision model (DeiT's hard or soft distillation on the logits): :func:`distillation_loss`.

Fast path :func:`torch_int1` (inference; ``backend="auto"`` picks the reference when gradients are needed): the ±1
codes are int8 and ``sign(Q) sign(K)ᵀ`` is a real integer product, ``torch._int_mm`` in int32
(:func:`attnzoo.kernels.lowp.grouped_int_scores`), exact: an integer in ``[−D, D]``, which every float dtype holds
exactly for ``D ≤ 256``. It is then scaled in the same order as the reference (``(ints · (scale·α_Q)) · α_K``), so
the logits are the reference's bit for bit; rows are processed in blocks (O(rows·Skv) memory). Exact against the
reference (the conformance suite holds it to fp64 round-off).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.errors import fail
from attnzoo.kernels.blocked_softmax import block_rows
from attnzoo.kernels.blockwise import grouped_pv
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kernels.lowp import grouped_int_scores
from attnzoo.methods.common import repeat_kv, visible
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, LayerInfo, MethodSpec, Param, TestHints, register

REL_DISTANCE = 64  # R of the rel_bias table nn.Attention creates
P_LEVELS = 255  # P̂ = round(255 P) / 255
V_LEVELS = 127  # V̂ codes in [−127, 127]
V_CLIP = 2.0  # the straight-through gradient of V̂ is cut outside (−2, 2)
EPS = 1e-6  # the released code's epsilon in V's scale


class SignSTE(torch.autograd.Function):
    """``sign(x)`` with ``sign(0) = +1``; backward: the straight-through estimator ``grad · 1[|x| ≤ 1]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def head_scale(x: torch.Tensor) -> torch.Tensor:
    """``α = mean |x|`` over the tokens and channels of each (batch, head): ``(B, H)``."""
    return x.abs().mean(dim=(-2, -1))


def relative_bias(table: torch.Tensor, rows: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """``table (H, 2R + 1)`` gathered at the clipped offsets ``clamp(j − i, −R, R) + R`` for the query indices
    ``rows`` and every key ``j``: ``(1, H, len(rows), Skv)``."""
    reach = (table.shape[1] - 1) // 2
    offsets = torch.arange(seq_kv, device=table.device) - rows.to(table.device).view(-1, 1)
    return table[:, offsets.clamp(-reach, reach) + reach].unsqueeze(0)


def quantize_probs(p: torch.Tensor) -> torch.Tensor:
    """``round(255 P) / 255`` (unsigned 8 bits, static scale), rounding passed straight through."""
    codes = (p * P_LEVELS).round().clamp(0, P_LEVELS) / P_LEVELS
    return p + (codes - p).detach()


def quantize_values(v: torch.Tensor) -> torch.Tensor:
    """8-bit symmetric per-channel ``V̂ = round(V·s) / (s + 1e-6)``, ``s = 127 / (max_tokens |V| + 1e-6)``; the
    gradient passes where ``|V| < 2``."""
    s = V_LEVELS / (v.detach().abs().amax(dim=-2, keepdim=True) + EPS)
    v_hat = torch.round(v.detach() * s) / (s + EPS)
    inside = (v.detach().abs() < V_CLIP).to(v.dtype)
    return v_hat + (v - v.detach()) * inside


def _logit_factors(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors the ±1 products are multiplied by, in this order: ``scale·α_Q (B, H, 1, 1)`` and
    ``α_K (B, Hkv, 1, 1)``."""
    return (scale * head_scale(q))[..., None, None], head_scale(k)[..., None, None]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, rel_bias: torch.Tensor | None, pv_bits: int | None,
) -> torch.Tensor:
    """The float sign formula of the module docstring, differentiable through straight-through estimators."""
    h = q.shape[1]
    query_factor, key_factor = _logit_factors(q, k, scale)
    products = SignSTE.apply(q) @ repeat_kv(SignSTE.apply(k), h).transpose(-1, -2)
    s = products * query_factor * repeat_kv(key_factor, h)
    if rel_bias is not None:
        s = s + relative_bias(rel_bias.to(s.dtype), torch.arange(q.shape[2]), k.shape[2])
    if bias is not None:
        s = s + bias
    p = safe_softmax(s, visible(causal, mask, q, k))
    if pv_bits is not None:
        p, v = quantize_probs(p), quantize_values(v)
    return p @ repeat_kv(v, h)


def torch_int1(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, rel_bias: torch.Tensor | None, pv_bits: int | None,
) -> torch.Tensor:
    """The ±1 product as an int8 matrix product in int32, by blocks of query rows (see the module docstring)."""
    b, h, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    query_factor, key_factor = _logit_factors(q, k, scale)
    q_codes = torch.where(q >= 0, 1, -1).to(torch.int8)
    k_codes = torch.where(k >= 0, 1, -1).to(torch.int8)
    if pv_bits is not None:
        v = quantize_values(v)
    out = q.new_empty(b, h, sq, v.shape[3])
    rows = block_rows(b, h, sq, skv)
    for start in range(0, sq, rows):
        end = min(sq, start + rows)
        s = grouped_int_scores(q_codes[:, :, start:end], k_codes).to(q.dtype)
        s = (s.view(b, hkv, h // hkv, end - start, skv) * query_factor.view(b, hkv, h // hkv, 1, 1)
             * key_factor.view(b, hkv, 1, 1, 1)).view(b, h, end - start, skv)
        if rel_bias is not None:
            s = s + relative_bias(rel_bias.to(s.dtype), torch.arange(start, end), skv)
        if bias is not None:
            s = s + masks.rows(bias, start, end)
        seen = masks.rows(mask, start, end)
        p = safe_softmax(s, torch.ones_like(s, dtype=torch.bool) if seen is None else seen.expand_as(s))
        if pv_bits is not None:
            p = quantize_probs(p)
        out[:, :, start:end] = grouped_pv(p, v)
    return out


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, kind: str = "hard",
    alpha: float = 0.5, tau: float = 1.0,
) -> torch.Tensor:
    """The distillation loss the paper trains with (DeiT's): logits ``student (N, C)`` of the binary model, ``teacher
    (N, C)`` of the full-precision one (detached here), optional class ``labels (N,)``.

    ``kind="hard"``: cross-entropy against the teacher's argmax; ``"soft"``: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))``
    summed and divided by ``student.numel()`` (DeiT's normalisation). With ``labels`` the result is
    ``(1 − α)·CE(student, labels) + α·distillation``; without, the distillation term alone.
    """
    if not isinstance(student, torch.Tensor) or student.dim() != 2:
        raise fail("student", "a (batch, classes) tensor of logits", getattr(student, "shape", type(student)))
    if not isinstance(teacher, torch.Tensor) or teacher.shape != student.shape:
        raise fail("teacher", f"logits of the student's shape {tuple(student.shape)}",
                   getattr(teacher, "shape", type(teacher)))
    if kind not in ("hard", "soft"):
        raise fail("kind", "'hard' or 'soft'", repr(kind))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise fail("alpha", "a number in [0, 1]", repr(alpha))
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise fail("tau", "a positive number", repr(tau))
    teacher = teacher.detach()
    if kind == "hard":
        distill = F.cross_entropy(student, teacher.argmax(dim=-1))
    else:
        distill = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1),
                           reduction="sum", log_target=True) * (tau * tau) / student.numel()
    if labels is None:
        return distill
    return (1 - alpha) * F.cross_entropy(student, labels) + alpha * distill


def _table_check(value: torch.Tensor, call: Call) -> str | None:
    if value.dim() != 2 or value.shape[0] != call.heads or value.shape[1] % 2 != 1:
        return f"a tensor of shape ({call.heads}, 2R + 1) (heads, clipped offsets −R..R)"
    if not value.is_floating_point():
        return "a floating-point tensor"
    return None


def _table_init(layer: LayerInfo) -> torch.Tensor:
    return torch.nn.init.trunc_normal_(torch.empty(layer.heads, 2 * REL_DISTANCE + 1), std=0.02)


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    table = 0.5 * torch.randn(call.heads, 2 * 5 + 1, generator=generator, dtype=torch.float64)
    return {"rel_bias": table.to(call.dtype)}


SPEC = MethodSpec(
    name="binary",
    family="precision",
    mechanism="Q2",
    paper="BinaryAttention: One-Bit QK-Attention for Vision and Diffusion Transformers",
    arxiv="2603.09582",
    summary="softmax of scale·α_Q α_K sign(Q)·sign(K)ᵀ plus a learnable relative bias (±1 product in INT8), "
    "optional 8-bit P·V",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param("rel_bias", (torch.Tensor,), None, "learnable relative-position bias table (heads, 2R + 1) over the "
              "clipped offsets j − i", check=_table_check, init=_table_init),
        Param("pv_bits", (int,), None, "8: the paper's 8-bit P (scale 1/255) and V (per channel); None: float P·V",
              choices=(8,)),
    ),
    complexity="O(N²d) time in INT8 ±1 products; O(rows·N) memory per block of query rows",
    tests=TestHints(sample_params=_sample),
)


register(SPEC, reference, [Backend("torch", torch_int1, differentiable=False)])
