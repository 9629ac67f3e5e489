"""A KV cache that stores each token's keys and values in a low-rank orthonormal basis (MatryoshkaKV, K10).

A :class:`ProjectedKVCache` is a :class:`~attnzoo.kv.cache.KVCache` whose ``keys (B, Hkv, L, r_k)`` and
``values (B, Hkv, L, r_v)`` are coordinates in per-kv-head bases (:class:`Projection`): a token ``x`` is stored as
``y = (x − μ) U_r`` (``U_r``: ``r`` orthonormal columns, ``μ``: a mean) and stands for ``x̂ = μ + y U_rᵀ``.
Attention reads in the projected space (nothing is expanded back per token):

- scores: ``q·k̂ = (q U_r)·y_k + q·μ_k`` — the query is projected once per step;
- output: ``Σ_j p_j v̂_j = (Σ_j p_j y_v,j) U_rᵀ + (Σ_j p_j) μ_v`` — one expansion per query, not per token.

With the full rank (``U`` square) both are exact. Appends project the new tokens; :meth:`KVCache.keep` (scoring
presses after this one) keeps slots per head as for any cache; rings work unchanged. The coordinates may be stored
in a lower precision than the inputs (``dtype``); reads compute in the queries' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from attnzoo.kernels.blockwise import grouped_logits, grouped_pv
from attnzoo.kv.cache import KVCache, _per_query_head


@dataclass(frozen=True, eq=False)
class Projection:
    """``basis (B|1, Hkv, D, r)`` with orthonormal columns and ``mean (B|1, Hkv, 1, D)``: ``x ↦ (x − mean) basis``
    (a leading 1 shares them across the batch)."""

    basis: torch.Tensor
    mean: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates ``(B, Hkv, T, r)`` of ``x (B, Hkv, T, D)``, in ``x``'s dtype."""
        return torch.matmul(x - self.mean.to(x.dtype), self.basis.to(x.dtype))

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q U_r`` for queries ``q (B, H, T, D)`` (query head ``i`` uses kv head ``i // (H / Hkv)``'s basis)."""
        return _grouped_matmul(q, self.basis.to(q.dtype))

    def offset(self, q: torch.Tensor) -> torch.Tensor:
        """``q·μ`` ``(B, H, T, 1)``: the part of every score that the mean contributes."""
        return _grouped_matmul(q, self.mean.to(q.dtype).transpose(-1, -2))

    def back(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``y U_rᵀ + weight·μ`` for query-head rows ``y (B, H, T, r)`` and their total weights ``(B, H, T, 1)``."""
        return _grouped_matmul(y, self.basis.to(y.dtype).transpose(-1, -2)) + weight * _per_head_mean(self.mean, y)

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.basis, self.mean))


@dataclass(frozen=True, eq=False)
class ProjectedKVCache(KVCache):
    """A :class:`KVCache` of projected coordinates (see the module doc); ``key_projection`` and
    ``value_projection`` map tokens in and out."""

    key_projection: Projection | None = None
    value_projection: Projection | None = None

    plain: ClassVar[bool] = False

    @classmethod
    def project(
        cls, cache: KVCache, keys: Projection, values: Projection, dtype: torch.dtype | None = None,
    ) -> ProjectedKVCache:
        """``cache`` with its keys and values projected, stored in ``dtype`` (default: the cache's)."""
        dtype = cache.keys.dtype if dtype is None else dtype
        given = {f.name: getattr(cache, f.name) for f in fields(KVCache)}
        given.update(keys=keys.forward(cache.keys).to(dtype), values=values.forward(cache.values).to(dtype),
                     storage=None, version=0)
        stored = [Projection(p.basis.to(dtype), p.mean.to(dtype)) for p in (keys, values)]
        return cls(**given, key_projection=stored[0], value_projection=stored[1])

    @property
    def nbytes(self) -> int:
        """Bytes held: the projected coordinates (capacity included), positions, and both projections."""
        assert self.key_projection is not None and self.value_projection is not None
        return super().nbytes + self.key_projection.nbytes + self.value_projection.nbytes

    def scores(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale · ((q U_k)·y_k + q·μ_k)`` (+ ``log_weight``) over every slot: ``(B, H, T, L)``."""
        assert self.key_projection is not None
        s = grouped_logits(self.key_projection.queries(q), self.keys.to(q.dtype), scale)
        s = s + scale * self.key_projection.offset(q)
        if self.log_weight is not None:
            s = s + _per_query_head(self.log_weight, q.shape[1]).unsqueeze(2)
        return s

    def combine(self, p: torch.Tensor) -> torch.Tensor:
        """``(Σ p y_v) U_vᵀ + (Σ p) μ_v``: ``(B, H, T, Dv)``."""
        assert self.value_projection is not None
        y = grouped_pv(p, self.values.to(p.dtype))
        return self.value_projection.back(y, p.sum(-1, keepdim=True))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> ProjectedKVCache:
        """The cache after ``T`` more tokens per sequence, projected on the way in."""
        assert self.key_projection is not None and self.value_projection is not None
        k_r = self.key_projection.forward(k).to(self.keys.dtype)
        v_r = self.value_projection.forward(v).to(self.values.dtype)
        return super().append(k_r, v_r)  # type: ignore[return-value]


def _grouped_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x (B, H, T, a)`` times each query head's kv-head matrix ``m (B|1, Hkv, a, c)``: ``(B, H, T, c)``."""
    b, h, t, a = x.shape
    hkv = m.shape[1]
    out = torch.matmul(x.reshape(b, hkv, (h // hkv) * t, a), m)
    return out.view(b, h, t, m.shape[-1])


def _per_head_mean(mean: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mean (B|1, Hkv, 1, D)`` as ``(B|1, H, 1, D)`` for the query heads of ``like (B, H, ·, ·)``."""
    h, hkv = like.shape[1], mean.shape[1]
    return mean.to(like.dtype).repeat_interleave(h // hkv, dim=1)
