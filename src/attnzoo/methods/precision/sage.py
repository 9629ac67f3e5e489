"""Q1 — SageAttention (v1) and SageAttention2 (v2): 8-bit (or 4-bit) QKᵀ with smoothing, low-precision P·V.

Papers: "SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference Acceleration" (Zhang, Wei, Zhu, Chen;
ICLR 2025; arXiv:2410.02367) and "SageAttention2: Efficient Attention with Thorough Outlier Smoothing and Per-thread
INT4 Quantization" (Zhang et al.; ICML 2025; arXiv:2411.10958). Public code: github.com/thu-ml/SageAttention (its
block sizes, group layouts and rounding are what we follow; nothing is copied).

The method *is* softmax attention, ``softmax(scale·QKᵀ + bias) V``: :func:`reference` computes exactly that. The fast
path :func:`torch_int8` computes it the way the papers' kernels do, in low precision, so it is declared approximate
with the tolerance measured on the conformance inputs (see :data:`TOLERANCE`).

What :func:`torch_int8` computes, per (batch, head):

1. **K smoothing** (``smooth_k=True``, both versions): ``K ← K − mean_tokens(K)`` per channel (over all keys, the
   mask not consulted, as the kernels do). Exact for softmax: ``q_i·(k_j − k̄) = q_i·k_j − q_i·k̄`` shifts each row
   of logits by a constant, which softmax ignores (:func:`smooth_keys`; the test shows it in fp64). It removes the
   channel-wise outliers of K, which share a sign across tokens, so the quantisation step shrinks.
2. **Q smoothing** (version 2): per block of 128 query rows, ``Q ← Q − q̄_block`` and the term ``ΔS = q̄_block·Kᵀ`` is
   computed in float32 and added back to the dequantised logits (:func:`smooth_queries`, exact in fp64 too).
3. **Quantisation** of Q and K to ``qk_bits`` (8: INT8 in ``[−127, 127]``; 4: INT4 in ``[−7, 7]`` held in int8),
   symmetric, one scale ``max|x| / qmax`` per group of tokens (:func:`attnzoo.kernels.lowp.quantize_symmetric`),
   codes rounded half away from zero. ``granularity`` sets the groups (the kernels' ``BLKQ = 128``, ``WARPQ = 32``,
   ``BLKK = 64``):

   - ``"block"`` (v1's default): Q blocks of 128 rows, K blocks of 64 tokens;
   - ``"warp"``: Q blocks of 32 rows (one per warp), K blocks of 64;
   - ``"thread"`` (v2's default): inside each 32-row warp block, the rows ``i ≡ t (mod 8)`` (the rows one thread of
     an ``mma.m16n8k32`` holds; 8 groups of 4 rows), and inside each 64-token K block the tokens with
     ``(j mod 8) // 2 = t`` (4 groups of 16).
4. **QKᵀ as a real integer product**: int8 × int8 → int32 by ``torch._int_mm`` (exact;
   :func:`attnzoo.kernels.lowp.grouped_int_scores`), dequantised by ``scale · δ_Q(i) · δ_K(j)``.
5. **Softmax** in float32, online as in the kernels: over the key blocks of 64 in order, ``m_b`` is the running
   maximum of the logits up to block ``b``, ``P̃ = exp(S − m_b)`` on block ``b`` (this ``P̃`` is what step 6
   rounds), ``l = Σ_b e^{m_b − m_last} Σ P̃`` from the unrounded ``P̃``, and each block's P·V partial is rescaled by
   ``e^{m_b − m_last}`` in the float32 buffer (the kernels rescale the buffer at each new maximum: the same sum, in
   one pass here). With ``pv="fp32"`` the row's final maximum serves every block (nothing is rounded).
6. **P·V** by ``pv``:

   - ``"fp16"`` (v1's default; the ``qk_int8_pv_fp16`` kernels with the FP16 accumulator): ``P̃`` and ``V`` rounded
     to float16; each key block of 64 contributes ``P̃_blk V_blk`` accumulated in float16 (we round the block's
     float32 product once), then added to a float32 buffer (values beyond float16's ±65504 overflow, as in the
     kernels, which convert V to float16 too);
   - ``"fp8"`` (v2's default; the ``qk_int8_pv_fp8`` kernels): ``V`` quantised to float8 e4m3 per channel (scale
     ``max|V| / 448`` over the tokens), ``P̃`` to e4m3 with the static scale 448 (``P̃ ≤ 1``); the products of each
     32-token step (``mma.k32``) are summed into the FP22 accumulator (float32 with 13 mantissa bits,
     :func:`attnzoo.kernels.lowp.truncate_fp22`), which is added to a float32 buffer after every 64-token block
     (the paper's two-level accumulation);
   - ``"fp32"``: ``P̃ V`` in float32 (isolates the error of the quantised QKᵀ).
7. ``O = buffer / l``; a row that sees no key gives 0.

Inputs of any float dtype are computed in float32 and the output is returned in the input dtype. Masks, additive
bias, causal (bottom-right), cross-attention and GQA are served (the kernels serve causal and GQA; a mask or bias is
added to the dequantised logits). Memory: the path works on blocks of query rows
(:func:`attnzoo.kernels.blocked_softmax.block_rows`), O(rows·Skv) at a time. There is no backward: training uses the
reference (the quantisation has no useful gradient), and ``backend="auto"`` picks it when inputs need gradients.

Parameters: ``version`` (1 or 2, default 2), ``granularity`` (None: the version's), ``qk_bits`` (8 or 4, default 8;
SageAttention2's INT4 variant uses 4 with per-thread groups), ``pv`` (None: the version's), ``smooth_k`` (True).
Released SageAttention2 kernels use INT8 Q/K without Q smoothing; the paper's Q smoothing is what ``version=2`` adds
here, as the catalogue asks.

Accuracy against float32 attention on every layer of the pretrained all-MiniLM-L6-v2 and on inputs with outlier
channels: :mod:`attnzoo.bench.suites.precision` (``python -m attnzoo.bench.suites.precision``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.kernels.blocked_softmax import block_rows
from attnzoo.kernels.lowp import (
    FP8_E4M3_MAX,
    grouped_int_scores,
    quantize_symmetric,
    to_fp8_e4m3,
    to_fp16,
    truncate_fp22,
)
from attnzoo.methods.common import masked_attention, visible
from attnzoo.registry import ALL_PATTERNS, Backend, MethodSpec, Param, Tolerance, register

BLOCK_Q = 128  # query rows per block (BLKQ): v1's Q groups, v2's Q-smoothing blocks
WARP_Q = 32  # query rows per warp (WARPQ): "warp" groups, and the blocks "thread" groups stride within
BLOCK_K = 64  # keys per block (BLKK): K groups, and the P·V accumulation blocks
MMA_K = 32  # keys per FP8 mma instruction (m16n8k32): the FP22 accumulation steps
QMAX = {8: 127, 4: 7}
GRANULARITY = {1: "block", 2: "thread"}
PV = {1: "fp16", 2: "fp8"}

# Measured on the conformance inputs (randn q, k, v; head_dim 8 and 16; every pattern, with and without a mask, fp32
# and fp64 inputs, every version × pv × granularity at qk_bits=8): at rtol 0.05 the largest atol needed was 0.018 with
# pv "fp16"/"fp32" and 0.079 with "fp8" (e4m3 keeps 3 mantissa bits: V itself is off by up to 6 %, which a row
# reading one or two keys passes on); on 1500 random shapes of the fuzz test's ranges (defaults) 0.088. The bound is
# the default's (fp8) with a 1.7× margin. INT4 (qk_bits=4) is far coarser and is not held to it.
TOLERANCE = Tolerance(atol=0.15, rtol=0.05)


def _settings(version: int, granularity: str | None, pv: str | None) -> tuple[str, str]:
    return granularity or GRANULARITY[version], pv or PV[version]


def query_groups(n: int, granularity: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """The quantisation group of each of ``n`` query rows under ``granularity``, and the number of groups."""
    i = torch.arange(n, device=device)
    if granularity == "block":
        return i // BLOCK_Q, -(-n // BLOCK_Q)
    if granularity == "warp":
        return i // WARP_Q, -(-n // WARP_Q)
    return (i // WARP_Q) * 8 + i % 8, -(-n // WARP_Q) * 8


def key_groups(n: int, granularity: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """The quantisation group of each of ``n`` keys under ``granularity``, and the number of groups."""
    j = torch.arange(n, device=device)
    if granularity == "thread":
        return (j // BLOCK_K) * 4 + (j % 8) // 2, -(-n // BLOCK_K) * 4
    return j // BLOCK_K, -(-n // BLOCK_K)


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """``K − mean_tokens(K)`` per (batch, head, channel): softmax attention over it is that over ``K``."""
    return k - k.mean(dim=2, keepdim=True)


def smooth_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q − q̄_block, q̄)``: each block of :data:`BLOCK_Q` query rows minus its mean, and the means ``(B, H, blocks,
    D)``; ``(Q − q̄)Kᵀ + q̄Kᵀ = QKᵀ``."""
    b, h, n, d = q.shape
    blocks = -(-n // BLOCK_Q)
    index = torch.arange(n, device=q.device) // BLOCK_Q
    sums = q.new_zeros(b, h, blocks, d).index_add_(2, index, q)
    counts = torch.bincount(index, minlength=blocks).to(q.dtype).view(1, 1, blocks, 1)
    means = sums / counts
    return q - means.index_select(2, index), means


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, version: int, granularity: str | None, qk_bits: int, pv: str | None,
    smooth_k: bool,
) -> torch.Tensor:
    """Softmax attention: what SageAttention computes, without its quantisation (the parameters only set that)."""
    return masked_attention(q, k, v, visible(causal, None, q, k), scale, mask, bias)


def torch_int8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, version: int, granularity: str | None, qk_bits: int, pv: str | None,
    smooth_k: bool,
) -> torch.Tensor:
    """SageAttention as the module docstring describes: INT8/INT4 QKᵀ by ``torch._int_mm``, P·V in ``pv``."""
    gran, pv_ = _settings(version, granularity, pv)
    b, h, sq, _ = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    qf, kf = q.float(), k.float()
    if smooth_k:
        kf = smooth_keys(kf)
    group = h // hkv
    delta = None
    if version == 2:
        qf, means = smooth_queries(qf)
        delta = torch.matmul(means.reshape(b, hkv, -1, means.shape[-1]), kf.transpose(-1, -2))
        delta = delta.view(b, h, -1, skv).mul_(scale)  # ΔS per query block, already scaled
    q8, q_scale = quantize_symmetric(qf, *query_groups(sq, gran, q.device), QMAX[qk_bits])
    k8, k_scale = quantize_symmetric(kf, *key_groups(skv, gran, q.device), QMAX[qk_bits])
    values, v_scale = _prepared_values(v.float(), pv_)
    out = torch.empty(b, h, sq, dv, dtype=torch.float32, device=q.device)
    rows = block_rows(b, h, sq, skv)
    for start in range(0, sq, rows):
        end = min(sq, start + rows)
        s = grouped_int_scores(q8[:, :, start:end], k8).float()
        s = s.view(b, hkv, group, end - start, skv)
        s.mul_((q_scale[:, :, start:end] * scale).view(b, hkv, group, end - start, 1))
        s.mul_(k_scale.view(b, hkv, 1, 1, skv))
        s = s.view(b, h, end - start, skv)
        if delta is not None:
            s.add_(delta.index_select(2, torch.arange(start, end, device=q.device) // BLOCK_Q))
        out[:, :, start:end] = _softmax_pv(s, _rows_visible(causal, mask, start, end, sq, skv, q.device),
                                           masks.rows(bias, start, end), values, v_scale, pv_)
    return out.to(q.dtype)


def _prepared_values(v: torch.Tensor, pv: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V as the P·V product reads it (zero-padded to whole key blocks for fp16/fp8), and its fp8 channel scales."""
    if pv == "fp32":
        return v, None
    pad = -v.shape[2] % BLOCK_K
    if pv == "fp16":
        return F.pad(to_fp16(v), (0, 0, 0, pad)), None
    v_scale = (v.abs().amax(dim=2, keepdim=True) / FP8_E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return F.pad(to_fp8_e4m3(v / v_scale), (0, 0, 0, pad)), v_scale


def _rows_visible(
    causal: bool, mask: torch.Tensor | None, start: int, end: int, sq: int, skv: int, device: torch.device,
) -> torch.Tensor | None:
    """The keys query rows ``[start, end)`` may see (causal bottom-right and the user mask), broadcastable."""
    seen = masks.dense_rows(masks.causal(sq, skv), 1, 1, start, end, skv, device) if causal else None
    part = masks.rows(mask, start, end)
    if part is None:
        return seen
    return part if seen is None else seen & part


def _softmax_pv(
    s: torch.Tensor, seen: torch.Tensor | None, bias: torch.Tensor | None, values: torch.Tensor,
    v_scale: torch.Tensor | None, pv: str,
) -> torch.Tensor:
    """Steps 5–7 of the module docstring for logits ``s (B, H, r, Skv)``: ``(B, H, r, Dv)`` float32."""
    if bias is not None:
        s.add_(bias)
    if seen is not None:
        s.masked_fill_(~seen, float("-inf"))
    b, h, r, skv = s.shape
    hkv = values.shape[1]
    if pv == "fp32":
        top = s.amax(dim=-1, keepdim=True)
        p = s.sub_(_finite(top)).exp_()
        total = p.sum(dim=-1, keepdim=True)
        acc = torch.matmul(p.view(b, hkv, (h // hkv) * r, skv), values).view(b, h, r, -1)
    else:
        blocks = values.shape[2] // BLOCK_K
        padded = F.pad(s, (0, blocks * BLOCK_K - skv), value=float("-inf")).view(b, h, r, blocks, BLOCK_K)
        running = _finite(padded.amax(dim=-1).cummax(dim=-1).values)  # the kernel's running maximum per key block
        p = padded.sub_(running.unsqueeze(-1)).exp_()
        decay = torch.exp(running - running[..., -1:])  # rescaling of block b's partial by the later maxima
        total = (p.sum(dim=-1) * decay).sum(dim=-1, keepdim=True)
        grouped = p.view(b, hkv, (h // hkv) * r, blocks, BLOCK_K).transpose(2, 3)
        if pv == "fp16":
            partials = _fp16_blocks(grouped, values)
        else:
            partials = _fp8_blocks(grouped, values) * (v_scale / FP8_E4M3_MAX).unsqueeze(2)
        weights = decay.view(b, hkv, (h // hkv) * r, blocks).transpose(2, 3).unsqueeze(-1)
        acc = (partials * weights).sum(dim=2).view(b, h, r, -1)
    return torch.where(total > 0, acc / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(acc))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with ``-inf`` (a row or block prefix that sees no key yet) replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _block_values(values: torch.Tensor, chunk: int) -> torch.Tensor:
    """``values (B, Hkv, blocks·64, Dv)`` viewed as ``(B, Hkv, blocks, 64 / chunk, chunk, Dv)``."""
    b, hkv, n, dv = values.shape
    return values.view(b, hkv, n // BLOCK_K, BLOCK_K // chunk, chunk, dv)


def _fp16_blocks(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FP16 P·V per key block: ``p (B, Hkv, blocks, R, 64)`` and V rounded to float16, each block's product rounded
    to float16 (its accumulator): ``(B, Hkv, blocks, R, Dv)``."""
    return to_fp16(torch.matmul(to_fp16(p), _block_values(values, BLOCK_K)[:, :, :, 0]))


def _fp8_blocks(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FP8 P·V per key block (in units of the value scales / 448): ``P̃·448`` in e4m3 times the e4m3 values, each
    32-key step (one ``mma.k32``) added into the FP22 accumulator: ``(B, Hkv, blocks, R, Dv)``."""
    b, hkv, blocks, r, _ = p.shape
    steps = p.mul(FP8_E4M3_MAX).reshape(b, hkv, blocks, r, BLOCK_K // MMA_K, MMA_K).transpose(3, 4)
    products = torch.matmul(to_fp8_e4m3(steps), _block_values(values, MMA_K))  # (B, Hkv, blocks, 2, R, Dv)
    return truncate_fp22(truncate_fp22(products[:, :, :, 0]) + products[:, :, :, 1])


SPEC = MethodSpec(
    name="sage",
    family="precision",
    mechanism="Q1",
    paper="SageAttention2: Efficient Attention with Thorough Outlier Smoothing and Per-thread INT4 Quantization",
    arxiv="2411.10958",
    summary="softmax attention with K (and Q) smoothing, per-block/warp/thread INT8 QKᵀ (torch._int_mm) and "
    "FP16/FP8-emulated P·V; version=1 is SageAttention (arXiv:2410.02367)",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("version", (int,), 2, "1: SageAttention (per-block INT8, FP16 P·V); 2: SageAttention2 (Q smoothing, "
              "per-thread groups, FP8 P·V)", choices=(1, 2)),
        Param("granularity", (str,), None, "Q/K quantisation groups: 'block' (Q 128 rows, K 64), 'warp' (Q 32 rows), "
              "'thread' (strided per-thread groups); None: the version's", choices=("block", "warp", "thread")),
        Param("qk_bits", (int,), 8, "bits of the Q/K codes: 8 (INT8) or 4 (INT4, SageAttention2's 4-bit variant)",
              choices=(8, 4)),
        Param("pv", (str,), None, "P·V precision: 'fp16' (FP16 accumulator), 'fp8' (e4m3, FP22 + FP32 two-level "
              "accumulation), 'fp32'; None: the version's", choices=("fp16", "fp8", "fp32")),
        Param("smooth_k", (bool,), True, "subtract the token mean of K before quantising (exact for softmax)"),
    ),
    complexity="O(N²d) time in INT8 QKᵀ; O(rows·N) memory per block of query rows",
)


register(SPEC, reference, [
    Backend("torch", torch_int8, differentiable=False, exact=False, tolerance=TOLERANCE),
])
