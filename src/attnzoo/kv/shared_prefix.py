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

- every part is :func:`attnzoo.kernels.parts.part_attention`: the prefix, in fp32 on a CPU with oneDNN, one torch
  thread and from ``GEMM_MIN_SCORES`` (2^16) scores per KV head, is two oneDNN GEMMs per KV head with a fused
  softmax between them (:func:`attnzoo.kernels.parts.gemm_lse`: the decode prefix is compute-bound, and oneDNN runs
  AVX-512 where MKL, which the flash kernel calls, may not); otherwise, and for the suffix part always, PyTorch's
  CPU flash kernel (the suffix's visibility as an additive ``0/−inf`` mask); when autograd records the call,
  :func:`attnzoo.kernels.dense.attention_lse`, differentiable through the log-sum-exp;
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
from attnzoo.kernels.merge import merge_parts
from attnzoo.kernels.parts import part_attention

AUTO_MIN_BATCH = 2
AUTO_MIN_SHARED_KEYS = 1024  # batch · prefix: the prefix keys that sharing saves reading more than once
PATHS = ("auto", "shared", "plain")


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
    parts = [part_attention(q, prefix_k, prefix_v, scale), _group_lse(q, group_k, group_v, groups, scale),
             _suffix_lse(q, suffix_k, suffix_v, seen, scale)]
    return merge_parts(parts)[0]


def auto_path(batch: int, prefix: int) -> str:
    """Sharing pays when many sequences read a long prefix (see the module docstring for the measured rule)."""
    return "shared" if batch >= AUTO_MIN_BATCH and batch * prefix >= AUTO_MIN_SHARED_KEYS else "plain"


def _shared(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
    seen: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Hydragen: the prefix attended once by every query stacked, the suffix per sequence, the two merged."""
    parts = [part_attention(q, prefix_k, prefix_v, scale), _suffix_lse(q, suffix_k, suffix_v, seen, scale)]
    return merge_parts(parts)[0]


def _group_lse(
    q: torch.Tensor, group_k: torch.Tensor, group_v: torch.Tensor, groups: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's sequences stacked against its sub-prefix (one call per non-empty group), scattered back."""
    out = q.new_zeros(*q.shape[:3], group_v.shape[-1])
    lse = q.new_full(q.shape[:3], float("-inf"))
    for g in range(group_k.shape[0]):
        members = (groups == g).nonzero().squeeze(1)
        if members.numel():
            part_out, part_lse = part_attention(q[members], group_k[g : g + 1], group_v[g : g + 1], scale)
            out = out.index_copy(0, members, part_out)
            lse = lse.index_copy(0, members, part_lse.to(lse.dtype))
    return out, lse


def _suffix_lse(
    q: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor, seen: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence attention over the suffix; no mask tensor when every suffix key is visible."""
    return part_attention(q, suffix_k, suffix_v, scale, seen=None if bool(seen.all()) else seen)


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
