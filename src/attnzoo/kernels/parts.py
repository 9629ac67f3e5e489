"""Attention over one part of the keys, returning the log-sum-exp that merges it with the other parts.

:func:`part_attention` is the building block of the exact split-and-merge methods (:mod:`attnzoo.kernels.merge`):
each part — a shared prefix, a suffix, a set of contexts — is attended on its own and the parts are merged by
log-sum-exp (Hydragen, :mod:`attnzoo.kv.shared_prefix`; APE, :mod:`attnzoo.kv.ape`). It takes the fastest exact
route on CPU:

- the GQA group is folded into the query rows — ``(B, Hkv·G, Sq, D)`` -> ``(B, Hkv, G·Sq, D)`` — so K/V are never
  repeated; a part shared by the whole batch (``k`` of batch 1) also gets the batch folded into the rows, so every
  sequence's queries read it in one matrix product (Hydragen's inter-sequence batching);
- the folded rows of one K/V copy (a shared part, or batch 1) with no mask and enough scores per KV head
  (:data:`GEMM_MIN_SCORES`) take :func:`gemm_lse`: two oneDNN GEMMs and an in-place softmax per KV head; everything
  else PyTorch's CPU flash kernel (:data:`attnzoo.kernels.dense.flash_cpu`), which returns the row log-sum-exp;
- a causal part is bottom-right aligned (query ``i`` of ``Sq`` sees keys ``j ≤ Sk − Sq + i``): the kernel's own
  causal flag when ``Sq = Sk`` and no group is folded, else an additive ``0/−inf`` mask over the folded rows, as is
  a ``seen`` visibility; one query (``Sq = 1``) of a causal part sees every key and needs no mask;
- when autograd records the call (a tensor requires grad), when values and keys differ in width (``Dv ≠ D``: the
  flash kernel wants one head size) and off CPU, :func:`attnzoo.kernels.dense.attention_lse` serves it instead: the
  flash kernel whose backward carries the log-sum-exp's gradient where it can, else query chunks of dense attention
  (linear memory either way);
- a part with no key (``Sk = 0``), or a row that sees none of its keys, gives output 0 and log-sum-exp ``−inf``: it
  weighs nothing in a merge.
"""

from __future__ import annotations

import torch

from attnzoo import masks
from attnzoo.kernels.dense import attention_lse, flash_cpu

GEMM_MIN_SCORES = 1 << 16  # scores per KV head (rows × keys) from which one K/V copy takes oneDNN GEMMs
GEMM_SCORES = 1 << 22  # scores materialised at a time by gemm_lse (16 MiB in fp32)


def part_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool = False,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(B, H, Sq, Dv)`` and log-sum-exp ``(B, H, Sq)`` of ``q (B, H, Sq, D)`` over one part
    ``k (B or 1, Hkv, Sk, D)``, ``v (B or 1, Hkv, Sk, Dv)`` (``H`` a multiple of ``Hkv``; batch 1 is shared by the
    whole batch). ``causal``: bottom-right aligned. ``seen``: a boolean visibility broadcastable to
    ``(B, 1, Sq, Sk)`` (the same for every head), True = attend. Inputs are not checked: callers check their own
    arguments."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    causal = causal and sq > 1
    if sk == 0:
        return q.new_zeros(b, h, sq, v.shape[-1]), q.new_full((b, h, sq), float("-inf"))
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if recording or v.shape[-1] != d or q.device.type != "cpu":
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        return attention_lse(q, k, v, causal=causal, scale=scale, mask=seen, bias=None)
    if causal and seen is None and h == hkv and sq == sk:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out, lse = flash_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        return out, lse
    g = h // hkv
    shared = k.shape[0] == 1 and not causal and seen is None  # one copy read by every sequence's queries at once
    rows = q.reshape(b, hkv, g * sq, d)
    if shared:
        rows = rows.transpose(0, 1).reshape(1, hkv, b * g * sq, d)
        if onednn_fits(rows, k, v):
            out, lse = gemm_lse(rows[0], k[0], v[0], scale)
        else:
            out, lse = flash_cpu(rows, k, v, scale=scale)[:2]
        out, lse = out.reshape(hkv, b, g * sq, -1).transpose(0, 1), lse.reshape(hkv, b, g * sq).transpose(0, 1)
        return out.reshape(b, h, sq, -1), lse.reshape(b, h, sq).to(q.dtype)
    k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    visible = masks.combine(causal, None, sq, sk, q.device)
    if seen is not None:
        visible = seen if visible is None else seen & visible
    bias = None
    if visible is not None:  # row g·Sq + i is query i of group member g
        visible = visible.expand(b, 1, sq, sk).repeat(1, 1, g, 1)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out, lse = flash_cpu(rows, k, v, attn_mask=bias, scale=scale)[:2]
    if visible is not None:
        empty = ~visible.any(-1)  # rows that see no key: 0 and -inf, not the kernel's NaN
        if bool(empty.any()):
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
    return out.reshape(b, h, sq, -1), lse.reshape(b, h, sq)


def onednn_fits(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`gemm_lse` serves folded ``rows (1, Hkv, R, D)`` against one ``k``/``v`` copy: fp32 on CPU,
    torch running one intra-op thread, oneDNN present, enabled and in IEEE fp32 mode (not a reduced-precision
    ``fp32_precision`` setting) and at least ``GEMM_MIN_SCORES`` scores per KV head.

    One thread only: the route is a loop of small parallel regions, and with more threads than free cores each
    region waits for a descheduled thread — at two threads on the 2-core machine with one other busy process, the
    64 × 8192 Hydragen prefix took 330 ms where the flash kernel (one region) takes ≈ 10 ms. The flash kernel serves
    multi-threaded calls. Measured on the project's CPU (one thread, D=64, CPU time), the GEMMs beat
    the flash kernel from there (64 rows × 1024 keys: 1.32×; 32 × 2048: 1.39×; 16 × 8192: 1.31×; 64 × 8192: 1.58×)
    and tie or lose below it (64 × 512: 0.99×; 8 × 4096: 1.05×; 16 × 1024: 0.75×; 8 × 2048: 0.66×; 64 × 256:
    0.74×: the per-head loop's fixed cost)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)  # the fp32_precision setting exists from torch 2.9
    return (rows.device.type == "cpu" and rows.dtype == k.dtype == v.dtype == torch.float32
            and torch.get_num_threads() == 1 and rows.shape[2] * k.shape[2] >= GEMM_MIN_SCORES
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and getattr(matmul, "fp32_precision", "none") in ("none", "ieee"))


def gemm_lse(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows ``(Hkv, R, D)`` against ``k (Hkv, P, D)``, ``v (Hkv, P, Dv)`` by two oneDNN GEMMs per KV head and
    a fused softmax between them; ``(out (Hkv, R, Dv), lse (Hkv, R))``.

    Per KV head and per chunk of rows (at most ``GEMM_SCORES`` scores at a time): ``S = (scale · Q) Kᵀ``,
    ``m = max`` of each row, ``A = softmax(S)``, ``O = A V`` and ``lse = m − log max A`` (the largest weight is
    ``e⁰ / Σ e^{S − m}``, so ``lse = m + log Σ e^{S − m}`` without a second pass of exponentials). Choices:

    - the products are oneDNN's (``torch.ops.mkldnn._linear_pointwise``: ``x · wᵀ`` on dense tensors, ``K`` and
      ``Vᵀ`` passed as they lie, ``Vᵀ`` a strided view, no copy). In fp32 they are IEEE products like MKL's
      ``sgemm`` (which ``torch.matmul`` and the flash kernel call), but oneDNN runs its AVX-512 code on any CPU that
      has it, where MKL may fall back to AVX2 (AMD): on the project's machine 1.7–2× MKL's rate for these shapes;
    - the softmax overwrites the scores (aten's ``out=`` form; each row is reduced before it is rewritten), and each
      chunk's scores are freed before the next chunk's are made: one buffer per chunk, which the allocator hands
      back each time. A second buffer per chunk (``torch.softmax``'s result) made glibc return and re-fault its
      pages on every call (≈ 3600 page faults per call at 64 × 8192, ≈ 40 % of the time);
    - two ``amax`` passes rather than one ``max`` with its indices and a gather: the indexed reduction costs ten
      times the plain one on CPU (0.26 vs 0.024 ms on 64 × 8192 scores);
    - a loop of calls (about five parallel regions per KV head and chunk), where the flash kernel is one region: with
      more torch threads than free cores (a machine shared with other jobs) every region waits for a descheduled
      thread and the loop gets many times slower (64 × 8192, load ≈ 15 on 2 cores: 963 ms at two threads, 45 ms at
      one), hence :func:`onednn_fits`'s one-thread rule;
    - a decode prefix is compute-bound (``2 · 2 · R · P · D`` flops per head against one read of ``K``/``V``),
      which is why one score matrix per head, materialised, beats the flash kernel's small blocks there.
    """
    hkv, r, _ = rows.shape
    p = k.shape[1]
    scaled = rows * scale
    step = max(1, GEMM_SCORES // p)
    outs, lses = [], []
    for head in range(hkv):
        for start in range(0, r, step):
            scores = _onednn_linear(scaled[head, start : start + step], k[head])
            top = scores.amax(dim=-1)
            weights = torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place, row by row
            lses.append(top - weights.amax(dim=-1).log())
            outs.append(_onednn_linear(weights, v[head].t()))
            del scores, weights  # freed before the next chunk's scores are allocated: the allocator reuses them
    return torch.cat(outs).view(hkv, r, -1), torch.cat(lses).view(hkv, r)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x · wᵀ`` by oneDNN (no bias, no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
