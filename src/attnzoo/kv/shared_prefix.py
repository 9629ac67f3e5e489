"""K11 Hydragen — exact attention for a batch whose sequences share a prefix.

Paper: Juravsky et al., "Hydragen: High-Throughput LLM Inference with Shared Prefixes" (arXiv:2402.05099).

Each sequence ``b`` attends over ``[prefix; suffix_b]``. Softmax attention over a key set split into disjoint parts is
recovered exactly from each part's output and log-sum-exp (:func:`attnzoo.merge`), so Hydragen splits the keys into
the shared prefix and each sequence's own suffix:

- **prefix** (inter-sequence batching): the queries of every sequence are stacked into one matrix — per KV head,
  ``Q_prefix`` has ``G · B · Sq`` rows (``G = H / Hkv`` query heads per KV head, the GQA group folded into the rows, so
  K/V are never repeated) — and attend to the one prefix in a single call. Decoding thus turns ``B`` matrix-vector
  products over ``B`` copies of the prefix into one matrix-matrix product over one copy;
- **suffix**: ordinary per-sequence attention with the causal and padding mask;
- the two ``(out, lse)`` parts are merged: ``L = log(e^{L_p} + e^{L_s})``, ``O = e^{L_p − L} O_p + e^{L_s − L} O_s``.

Positions: the ``Sq`` queries are the last ``Sq`` positions of each sequence (bottom-right aligned), all inside its
suffix. Query ``i`` sees the whole prefix and the real suffix keys (``suffix_mask`` True) whose rank among the real
ones is ``≤ n_b − Sq + i`` (``n_b`` = number of real suffix keys of sequence ``b``), so padding may sit anywhere.

Choices:

- the prefix part, in fp32 on a CPU with oneDNN and from ``GEMM_MIN_SCORES`` (2^16) scores per KV head, is two
  oneDNN GEMMs per KV head with a fused softmax between them (:func:`_gemm_lse`: the decode prefix is compute-bound,
  and oneDNN runs AVX-512 where MKL, which the flash kernel calls, may not); otherwise, and for the suffix part
  always, PyTorch's CPU flash kernel (:data:`attnzoo.kernels.dense.flash_cpu`; the suffix's visibility as an additive
  ``0/−inf`` mask). Both return the row log-sum-exp but no gradient for it; when autograd is recording (a tensor
  requires grad) every part uses :func:`attnzoo.kernels.dense.softmax_attention_lse` instead, which is
  differentiable through the log-sum-exp;
- ``path="plain"`` is the baseline Hydragen replaces: the prefix is copied in front of every suffix and
  ``scaled_dot_product_attention`` runs per sequence. ``path="auto"`` takes the shared path when
  ``batch ≥ AUTO_MIN_BATCH`` (2) and ``batch · prefix ≥ AUTO_MIN_SHARED_KEYS`` (1024): the faster of the two paths.
  Measured on CPU (fp32, one thread, H=8, D=64, suffix 128, one decode query; CPU time, best of 5) the shared path
  beats the plain one from there (4 × 256: 1.3×, 8 × 128: 1.6×, 2 × 1024: 1.7×, 8 × 1024: 6.7×) and ties or loses
  below it (4 × 64: 0.94×, 2 × 256: 0.93×, 2 × 64: 0.73×, its calls' fixed cost; 1 × 1024: 1.05×, nothing shared).
  An engine that already holds a full cache per sequence (no copy) gains from sharing from about
  ``batch · prefix ≈ 4096`` (64 × 64: 1.3×, 4 × 1024: 1.7×, 2 × 4096: 1.9×, 64 × 256: 2.0×, 16 × 256: 2.2×,
  8 × 1024: 3.8×, 64 × 1024: 4.3×) and loses below it (8 × 128: 0.66×, 4 × 256: 0.57×, 2 × 1024: 0.7×);
- the path taken is returned when ``return_path=True`` (``(out, "shared" | "plain")``), so callers and tests can
  inspect ``auto``'s choice without timing it.

Two-level tree (:func:`tree_prefix_attention`, the paper's hierarchical sharing): a prefix shared by the whole batch,
sub-prefixes each shared by one group of the batch (``groups`` gives each sequence's group: a partition), and the
per-sequence suffixes — three parts, each attended with its queries stacked as above (one call for the prefix, one per
group), merged exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.dense import flash_cpu, softmax_attention_lse
from attnzoo.kernels.merge import merge_parts

AUTO_MIN_BATCH = 2
AUTO_MIN_SHARED_KEYS = 1024  # batch · prefix: the prefix keys that sharing saves reading more than once
PATHS = ("auto", "shared", "plain")
GEMM_MIN_SCORES = 1 << 16  # scores per KV head (rows × prefix keys) from which the prefix takes oneDNN GEMMs
GEMM_SCORES = 1 << 22  # scores materialised at a time by _gemm_lse (16 MiB in fp32)


def shared_prefix_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor,
    suffix_v: torch.Tensor, suffix_mask: torch.Tensor | None = None, *, scale: float | None = None,
    path: str = "auto", return_path: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, str]:
    """Softmax attention ``(B, H, Sq, Dv)`` of ``q`` over ``[prefix; suffix_b]`` for each sequence ``b``.

    ``q`` (B, H, Sq, D): the last ``Sq`` positions of each sequence; ``prefix_k``/``prefix_v`` (1, Hkv, P, D/Dv):
    shared by the whole batch; ``suffix_k``/``suffix_v`` (B, Hkv, S, D/Dv): per sequence; ``suffix_mask`` (B, S)
    bool, True = real token (ragged suffixes; each sequence needs at least ``Sq`` real tokens). ``scale`` defaults
    to ``D ** -0.5``. ``path``: ``"shared"`` (Hydragen), ``"plain"`` (prefix copied per sequence, SDPA) or
    ``"auto"``; with ``return_path=True`` the result is ``(out, path_taken)``.
    """
    _check(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_mask, path)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seen = _suffix_visibility(suffix_mask, q.shape[0], q.shape[2], suffix_k.shape[2], q.device)
    taken = path if path != "auto" else auto_path(q.shape[0], prefix_k.shape[2])
    if taken == "shared":
        out = _shared(q, prefix_k, prefix_v, suffix_k, suffix_v, seen, scale)
    else:
        out = _plain(q, prefix_k, prefix_v, suffix_k, suffix_v, seen, scale)
    return (out, taken) if return_path else out


def tree_prefix_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, group_k: torch.Tensor, group_v: torch.Tensor,
    groups: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor, suffix_mask: torch.Tensor | None = None,
    *, scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention ``(B, H, Sq, Dv)`` over ``[prefix; group prefix of b; suffix_b]`` for each sequence ``b``.

    As :func:`shared_prefix_attention` (always the shared path), plus ``group_k``/``group_v`` (G, Hkv, Pg, D/Dv): one
    sub-prefix per group, and ``groups`` (B,) integer: the group of each sequence (a group may be empty).
    """
    _check(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_mask, "shared")
    _check_groups(q, prefix_k, prefix_v, group_k, group_v, groups)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seen = _suffix_visibility(suffix_mask, q.shape[0], q.shape[2], suffix_k.shape[2], q.device)
    recording = _recording(q, prefix_k, prefix_v, group_k, group_v, suffix_k, suffix_v)
    parts = [_stacked_lse(q, prefix_k, prefix_v, scale, recording), _group_lse(q, group_k, group_v, groups, scale,
             recording), _suffix_lse(q, suffix_k, suffix_v, seen, scale, recording)]
    return merge_parts(parts)[0]


def auto_path(batch: int, prefix: int) -> str:
    """Sharing pays when many sequences read a long prefix (see the module docstring for the measured rule)."""
    return "shared" if batch >= AUTO_MIN_BATCH and batch * prefix >= AUTO_MIN_SHARED_KEYS else "plain"


def _shared(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
    seen: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Hydragen: the prefix attended once by every query stacked, the suffix per sequence, the two merged."""
    recording = _recording(q, prefix_k, prefix_v, suffix_k, suffix_v)
    parts = [_stacked_lse(q, prefix_k, prefix_v, scale, recording),
             _suffix_lse(q, suffix_k, suffix_v, seen, scale, recording)]
    return merge_parts(parts)[0]


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call (then the differentiable dense kernel replaces the flash one)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _stacked_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, recording: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's queries against one shared ``k``/``v`` (1, Hkv, P, D): ``(B, H, Sq, ·)`` rows stacked into
    one ``(1, H, B·Sq, D)`` matrix per head, attended in one call; returns ``(out, lse)`` in ``q``'s layout."""
    b, h, sq, d = q.shape
    stacked = q.transpose(0, 1).reshape(1, h, b * sq, d)
    if not recording and _onednn_fits(stacked, k, v):
        out, lse = _gemm_lse(stacked, k, v, scale)
    else:
        out, lse = _attend_lse(stacked, k, v, scale, None, recording)
    return out.view(h, b, sq, -1).transpose(0, 1), lse.view(h, b, sq).transpose(0, 1).to(q.dtype)


def _onednn_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`_gemm_lse` serves this shared-key call: fp32 on CPU, oneDNN present, enabled and in IEEE fp32 mode
    (not a reduced-precision ``fp32_precision`` setting) and at least ``GEMM_MIN_SCORES`` scores per KV head
    (stacked query rows × prefix keys). Measured on this CPU (one thread, D=64, CPU time), the GEMMs beat the flash
    kernel from there (64 rows × 1024 keys: 1.32×; 32 × 2048: 1.39×; 16 × 8192: 1.31×; 64 × 8192: 1.58×) and tie or
    lose below it (64 × 512: 0.99×; 8 × 4096: 1.05×; 16 × 1024: 0.75×; 8 × 2048: 0.66×; 64 × 256: 0.74×: the
    per-head loop's fixed cost)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)  # the fp32_precision setting exists from torch 2.9
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[1] // k.shape[1] * q.shape[2] * k.shape[2] >= GEMM_MIN_SCORES
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and getattr(matmul, "fp32_precision", "none") in ("none", "ieee"))


def _gemm_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked query rows ``q`` (1, H, R, D) against one shared ``k``/``v`` (1, Hkv, P, D/Dv) by two oneDNN GEMMs
    per KV head and a fused softmax between them; ``(out (1, H, R, Dv), lse (1, H, R))``.

    Per KV head (the GQA group folded into the rows, as in :func:`_attend_lse`) and per chunk of rows (at most
    ``GEMM_SCORES`` scores at a time): ``S = (scale · Q) Kᵀ``, ``m = max`` of each row, ``A = softmax(S)``,
    ``O = A V`` and ``lse = m − log max A`` (the largest weight is ``e⁰ / Σ e^{S − m}``, so
    ``lse = m + log Σ e^{S − m}`` without a second pass of exponentials). Choices:

    - the products are oneDNN's (``torch.ops.mkldnn._linear_pointwise``: ``x · wᵀ`` on dense tensors, ``K`` and
      ``Vᵀ`` passed as they lie, ``Vᵀ`` a strided view, no copy). In fp32 they are IEEE products like MKL's
      ``sgemm`` (which ``torch.matmul`` and the flash kernel call), but oneDNN runs its AVX-512 code on any CPU that
      has it, where MKL may fall back to AVX2 (AMD): on this machine 1.7–2× MKL's rate for these shapes;
    - the softmax overwrites the scores (aten's ``out=`` form; each row is reduced before it is rewritten), and each
      chunk's scores are freed before the next chunk's are made: one buffer per chunk, which the allocator hands
      back each time. A second buffer per chunk (``torch.softmax``'s result) made glibc return and re-fault its
      pages on every call (≈ 3600 page faults per call at 64 × 8192, ≈ 40 % of the time);
    - two ``amax`` passes rather than one ``max`` with its indices and a gather: the indexed reduction costs ten
      times the plain one on CPU (0.26 vs 0.024 ms on 64 × 8192 scores);
    - a loop of calls (about five parallel regions per KV head and chunk), where the flash kernel is one region: with
      more torch threads than free cores (a machine shared with other jobs) every region waits for a descheduled
      thread and the loop gets many times slower (64 × 8192, load ≈ 15 on 2 cores: 963 ms at two threads, 45 ms at
      one); on such a machine use one thread;
    - the decode prefix is compute-bound (``2 · 2 · R · P · D`` flops per head against one read of ``K``/``V``),
      which is why one score matrix per head, materialised, beats the flash kernel's small blocks here.
    """
    _, h, r, d = q.shape
    hkv, p = k.shape[1], k.shape[2]
    rows = (q * scale).view(hkv, (h // hkv) * r, d)
    step = max(1, GEMM_SCORES // p)
    outs, lses = [], []
    for head in range(hkv):
        for start in range(0, rows.shape[1], step):
            scores = _onednn_linear(rows[head, start : start + step], k[0, head])
            top = scores.amax(dim=-1)
            weights = torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place, row by row
            lses.append(top - weights.amax(dim=-1).log())
            outs.append(_onednn_linear(weights, v[0, head].t()))
            del scores, weights  # freed before the next chunk's scores are allocated: the allocator reuses them
    return torch.cat(outs).view(1, h, r, -1), torch.cat(lses).view(1, h, r)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x · wᵀ`` by oneDNN (no bias, no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _group_lse(
    q: torch.Tensor, group_k: torch.Tensor, group_v: torch.Tensor, groups: torch.Tensor, scale: float,
    recording: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's sequences stacked against its sub-prefix (one call per non-empty group), scattered back."""
    out = q.new_zeros(*q.shape[:3], group_v.shape[-1])
    lse = q.new_full(q.shape[:3], float("-inf"))
    for g in range(group_k.shape[0]):
        members = (groups == g).nonzero().squeeze(1)
        if members.numel():
            part_out, part_lse = _stacked_lse(q[members], group_k[g : g + 1], group_v[g : g + 1], scale, recording)
            out = out.index_copy(0, members, part_out)
            lse = lse.index_copy(0, members, part_lse)
    return out, lse


def _suffix_lse(
    q: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor, seen: torch.Tensor, scale: float,
    recording: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence attention over the suffix; no mask tensor when every suffix key is visible."""
    return _attend_lse(q, suffix_k, suffix_v, scale, None if bool(seen.all()) else seen, recording)


def _attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seen: torch.Tensor | None, recording: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp, ``(B, H, Sq, Dv)`` and ``(B, H, Sq)``; ``seen`` (B, 1, Sq, Sk) or None.

    Under autograd: :func:`softmax_attention_lse` (differentiable through the log-sum-exp). Otherwise PyTorch's CPU
    flash kernel, with the GQA group folded into the query rows — ``(B, Hkv·G, Sq, D)`` -> ``(B, Hkv, G·Sq, D)`` —
    so K/V are never repeated, and ``seen`` passed as an additive ``0/−inf`` mask (every row sees at least one key
    here, so no row is empty).
    """
    if recording:
        return softmax_attention_lse(q, k, v, scale, seen)
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    rows = q.reshape(b, hkv, (h // hkv) * sq, d)
    bias = None
    if seen is not None:
        seen = seen.expand(b, 1, sq, -1).repeat(1, 1, h // hkv, 1)
        bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
    out, lse = flash_cpu(rows, k, v, attn_mask=bias, scale=scale)[:2]
    return out.reshape(b, h, sq, -1), lse.reshape(b, h, sq)


def _plain(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
    seen: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The baseline: ``[prefix; suffix_b]`` materialised per sequence and attended with SDPA (GQA without copies)."""
    b, sq, p = q.shape[0], q.shape[2], prefix_k.shape[2]
    k = torch.cat([prefix_k.expand(b, -1, -1, -1), suffix_k], dim=2)
    v = torch.cat([prefix_v.expand(b, -1, -1, -1), suffix_v], dim=2)
    mask = None if bool(seen.all()) else torch.cat(
        [torch.ones(b, 1, sq, p, dtype=torch.bool, device=q.device), seen], dim=-1)  # no mask: SDPA's flash kernel
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _suffix_visibility(
    suffix_mask: torch.Tensor | None, b: int, sq: int, s: int, device: torch.device,
) -> torch.Tensor:
    """Boolean ``(B, 1, Sq, S)``: query ``i`` sees real suffix key ``j`` when ``rank(j) ≤ n_b − Sq + i``."""
    real = torch.ones(b, s, dtype=torch.bool, device=device) if suffix_mask is None else suffix_mask
    rank = real.long().cumsum(-1) - 1  # rank of each real key among its sequence's real keys
    last = real.sum(-1, keepdim=True) - sq + torch.arange(sq, device=device)  # (B, Sq): rank each query reaches
    return (real.unsqueeze(1) & (rank.unsqueeze(1) <= last.unsqueeze(-1))).unsqueeze(1)


def _check_groups(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, group_k: torch.Tensor, group_v: torch.Tensor,
    groups: torch.Tensor,
) -> None:
    """Sub-prefix shapes (one per group, the prefix's heads and dims) and ``groups`` (B,) integer in ``[0, G)``."""
    if group_k.dim() != 4 or group_k.shape[1] != prefix_k.shape[1] or group_k.shape[-1] != prefix_k.shape[-1]:
        raise fail("group_k", f"shape (G, {prefix_k.shape[1]}, Pg, {prefix_k.shape[-1]})", tuple(group_k.shape))
    if tuple(group_v.shape) != (*group_k.shape[:3], prefix_v.shape[-1]):
        raise fail("group_v", f"shape {(*group_k.shape[:3], prefix_v.shape[-1])}", tuple(group_v.shape))
    if groups.dtype.is_floating_point or groups.dtype == torch.bool or tuple(groups.shape) != (q.shape[0],):
        raise fail("groups", f"an integer tensor of shape ({q.shape[0]},)", f"{groups.dtype} {tuple(groups.shape)}")
    if groups.numel() and not (int(groups.min()) >= 0 and int(groups.max()) < group_k.shape[0]):
        raise fail("groups", f"group indices in [0, {group_k.shape[0]})", groups.tolist())


def _check(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
    suffix_mask: torch.Tensor | None, path: str,
) -> None:
    """Shapes, head grouping, ``suffix_mask`` and ``path``, each failure naming its argument."""
    if path not in PATHS:
        raise fail("path", f"one of {PATHS}", repr(path))
    for name, t in (("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                    ("suffix_v", suffix_v)):
        if t.dim() != 4:
            raise fail(name, "a 4-d tensor (batch, heads, seq, dim)", tuple(t.shape))
    b, h, sq, d = q.shape
    hkv, p = prefix_k.shape[1], prefix_k.shape[2]
    if prefix_k.shape[0] != 1 or prefix_k.shape[-1] != d:
        raise fail("prefix_k", f"shape (1, Hkv, P, {d})", tuple(prefix_k.shape))
    if h % hkv:
        raise fail("prefix_k", f"a number of heads dividing {h} (from q)", hkv)
    if tuple(prefix_v.shape[:3]) != (1, hkv, p):
        raise fail("prefix_v", f"shape (1, {hkv}, {p}, Dv) (from prefix_k)", tuple(prefix_v.shape))
    if suffix_k.shape[0] != b or suffix_k.shape[1] != hkv or suffix_k.shape[-1] != d:
        raise fail("suffix_k", f"shape ({b}, {hkv}, S, {d})", tuple(suffix_k.shape))
    if tuple(suffix_v.shape) != (*suffix_k.shape[:3], prefix_v.shape[-1]):
        raise fail("suffix_v", f"shape {(*suffix_k.shape[:3], prefix_v.shape[-1])}", tuple(suffix_v.shape))
    if suffix_mask is not None:
        if suffix_mask.dtype != torch.bool or tuple(suffix_mask.shape) != (b, suffix_k.shape[2]):
            raise fail("suffix_mask", f"a bool tensor of shape {(b, suffix_k.shape[2])}",
                       f"{suffix_mask.dtype} {tuple(suffix_mask.shape)}")
        shortest = int(suffix_mask.sum(-1).min())
    else:
        shortest = suffix_k.shape[2]
    if shortest < sq:
        raise fail("suffix_mask", f"at least {sq} real suffix tokens per sequence (the queries' positions)", shortest)
