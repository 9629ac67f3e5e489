"""Attention over one part of the keys, returning the log-sum-exp that merges it with the other parts.

:func:`part_attention` is the building block of the exact split-and-merge methods (:mod:`attnzoo.kernels.merge`):
each part — a shared prefix, a suffix, a set of contexts — is attended on its own and the parts are merged by
log-sum-exp. It takes the fastest exact route on CPU:

- PyTorch's CPU flash kernel (:data:`attnzoo.kernels.dense.flash_cpu`), which returns the row log-sum-exp, with
  the GQA group folded into the query rows — ``(B, Hkv·G, Sq, D)`` -> ``(B, Hkv, G·Sq, D)`` — so K/V are never
  repeated; a part shared by the whole batch (``k`` of batch 1) also gets the batch folded into the rows, so every
  sequence's queries read it in one matrix product (Hydragen's inter-sequence batching);
- a causal part is bottom-right aligned (query ``i`` of ``Sq`` sees keys ``j ≤ Sk − Sq + i``): the kernel's own
  causal flag when ``Sq = Sk`` and no group is folded, else an additive ``0/−inf`` mask over the folded rows; one
  query (``Sq = 1``) sees every key and needs no mask;
- when autograd records the call (a tensor requires grad), when values and keys differ in width (``Dv ≠ D``: the
  flash kernel wants one head size) and off CPU, :func:`attnzoo.kernels.dense.attention_lse` serves it instead: the
  flash kernel whose backward carries the log-sum-exp's gradient where it can, else query chunks of dense attention
  (linear memory either way);
- a part with no key (``Sk = 0``) gives output 0 and log-sum-exp ``−inf``: it weighs nothing in a merge.
"""

from __future__ import annotations

import torch

from attnzoo import masks
from attnzoo.kernels.dense import attention_lse, flash_cpu


def part_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(B, H, Sq, Dv)`` and log-sum-exp ``(B, H, Sq)`` of ``q (B, H, Sq, D)`` over one part
    ``k (B or 1, Hkv, Sk, D)``, ``v (B or 1, Hkv, Sk, Dv)`` (``H`` a multiple of ``Hkv``; batch 1 is shared by the
    whole batch). ``causal``: bottom-right aligned. Inputs are not checked: callers check their own arguments."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    causal = causal and sq > 1
    if sk == 0:
        return q.new_zeros(b, h, sq, v.shape[-1]), q.new_full((b, h, sq), float("-inf"))
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if recording or v.shape[-1] != d or q.device.type != "cpu":
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        return attention_lse(q, k, v, causal=causal, scale=scale, mask=None, bias=None)
    if causal and h == hkv and sq == sk:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out, lse = flash_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        return out, lse
    g = h // hkv
    shared = k.shape[0] == 1 and b > 1 and not causal  # one copy read by every sequence's queries at once
    rows = q.reshape(b, hkv, g * sq, d)
    if shared:
        rows = rows.transpose(0, 1).reshape(1, hkv, b * g * sq, d)
    else:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    bias = None
    if causal:
        seen = masks.combine(True, None, sq, sk, q.device).repeat(1, 1, g, 1)  # row g·Sq + i is query i
        bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
    out, lse = flash_cpu(rows, k, v, attn_mask=bias, scale=scale)[:2]
    if shared:
        out, lse = out.reshape(hkv, b, g * sq, -1).transpose(0, 1), lse.reshape(hkv, b, g * sq).transpose(0, 1)
    return out.reshape(b, h, sq, -1), lse.reshape(b, h, sq)
