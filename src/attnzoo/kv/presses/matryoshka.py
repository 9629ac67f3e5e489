"""K10 — MatryoshkaKV: keys and values stored in nested low-rank orthonormal bases (PCA-initialised, trainable).

Paper: Lin et al., "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection", ICLR 2025,
arXiv:2410.14731 (details checked against the authors' public code, The-kamisato/MatryoshkaKV-cache).

Each kv head ``h`` has, for keys and for values, a mean ``μ`` and an orthogonal matrix ``U`` (``D × D``) whose columns
are ordered by importance. A token is cached as its first ``r`` coordinates ``y = (x − μ) U_r`` (``U_r`` = the first
``r`` columns) — *nested* ranks: every prefix of the same basis is a valid, smaller cache, which is what the paper's
Matryoshka training (a random rank per step) makes good at every rank. Attention reads in the projected space
(:mod:`attnzoo.kv.projected`):

- ``q·k ≈ q·μ_k + (q U_r)·((k − μ_k) U_r)`` — exact at full rank;
- ``out = Σ_j p_j v̂_j = (Σ_j p_j (v_j − μ_v) U_r) U_rᵀ + μ_v`` — exact at full rank.

Initialisation (:func:`calibrate_matryoshka`): PCA per kv head on calibration keys and values — ``μ`` the mean token,
``U`` the eigenvectors of the centred covariance in decreasing eigenvalue order (the authors centre with the mean, as
here). Without calibrated projections the press calibrates on each sequence's own prompt (a per-sequence PCA: the
best rank-``r`` basis for exactly those tokens, which a deployed model would not have; pass ``projections`` for the
paper's setting). Training (:func:`train_matryoshka`, optional): ``U = U₀ · cayley(A)`` with ``A`` skew-symmetric,
``cayley(A) = (I − A/2)⁻¹(I + A/2)`` (the authors' Cayley parametrisation: ``U`` stays exactly orthogonal), and the
means are fitted by gradient on the attention output error at ranks drawn at random each step.

Ranks: ``rank`` for keys and ``value_rank`` for values (default: ``rank``); or ``fraction`` of the head dimension
(``round(fraction·D)``, at least 1); default half the head dimension. Coordinates are stored in ``dtype`` (default:
the cache's); with ``dtype=torch.float16`` and half rank the cache takes ~0.5 of a float16 cache
(``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache, check_lengths
from attnzoo.kv.presses.base import Press, PressContext, register_press
from attnzoo.kv.projected import ProjectedKVCache, Projection


@dataclass(frozen=True, eq=False)
class MatryoshkaProjections:
    """Per-kv-head orthogonal bases (columns in decreasing importance) and means: ``key_basis (G, Hkv, D, D)``,
    ``key_mean (G, Hkv, D)``, ``value_basis (G, Hkv, Dv, Dv)``, ``value_mean (G, Hkv, Dv)``. ``G`` is 1 for bases
    shared by every sequence (:func:`calibrate_matryoshka`) or the batch size for per-sequence ones."""

    key_basis: torch.Tensor
    key_mean: torch.Tensor
    value_basis: torch.Tensor
    value_mean: torch.Tensor

    def truncated(self, rank: int, value_rank: int) -> tuple[Projection, Projection]:
        """The cache's projections at these ranks (the first columns of each basis)."""
        return (Projection(self.key_basis[..., :rank], self.key_mean.unsqueeze(2)),
                Projection(self.value_basis[..., :value_rank], self.value_mean.unsqueeze(2)))


def calibrate_matryoshka(
    keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor | None = None,
) -> MatryoshkaProjections:
    """PCA per kv head of calibration ``keys (N, Hkv, L, D)`` and ``values (N, Hkv, L, Dv)`` (``lengths (N,)``: real
    tokens per sample, the rest padding): bases shared by every sequence (``G = 1``)."""
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise fail("values", f"a (N, kv_heads, L, Dv) tensor matching keys {tuple(keys.shape)}", tuple(values.shape))
    n, _, length, _ = keys.shape
    real = torch.arange(length, device=keys.device) < check_lengths(lengths, n, length, keys.device).view(n, 1, 1)
    key_basis, key_mean = _pca(keys, real, per_sequence=False)
    value_basis, value_mean = _pca(values, real, per_sequence=False)
    return MatryoshkaProjections(key_basis, key_mean, value_basis, value_mean)


def _pca(x: torch.Tensor, real: torch.Tensor, per_sequence: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases ``(G, Hkv, D, D)`` (eigenvectors of the centred covariance, decreasing eigenvalue) and means
    ``(G, Hkv, D)`` of the rows of ``x (B, Hkv, L, D)`` where ``real (B, Hkv|1, L)``; ``G = B`` per sequence, else 1.
    Computed in float64."""
    real = real.unsqueeze(-1).expand(*x.shape[:3], 1)
    xs = torch.where(real, x.detach().to(torch.float64), 0)  # padding never enters (even if it is not finite)
    dims = (2,) if per_sequence else (0, 2)
    count = real.sum(dims, keepdim=True).clamp(min=1)
    mean = xs.sum(dims, keepdim=True) / count
    centred = torch.where(real, xs - mean, 0)
    cov = torch.matmul(centred.transpose(-1, -2), centred)
    if not per_sequence:
        cov = cov.sum(0, keepdim=True)
    _, vectors = torch.linalg.eigh(cov)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return vectors.flip(-1).to(dtype), mean[..., 0, :].expand(cov.shape[0], -1, -1).to(dtype)


@dataclass(frozen=True, eq=False)
class MatryoshkaKVPress(Press):
    """Store keys at ``rank`` and values at ``value_rank`` coordinates per kv head (or ``fraction`` of the head
    dimension; default half) in the ``projections``' bases (default: a PCA of each sequence's prompt; a sequence of
    projections: one per layer, chosen by the context's ``layer``), in ``dtype``."""

    rank: int | None = None
    value_rank: int | None = None
    fraction: float | None = None
    projections: MatryoshkaProjections | Sequence[MatryoshkaProjections] | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "value_rank"):
            r = getattr(self, name)
            if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
                raise fail(name, "a positive number of coordinates per head (or None)", repr(r))
        f = self.fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise fail("fraction", "a fraction in (0, 1] of the head dimension (or None)", repr(f))
        if f is not None and self.rank is not None:
            raise fail("fraction", "None when rank is given (one way to choose the rank)", repr(f))
        given = self.projections
        per_layer = given if isinstance(given, (list, tuple)) else [given]
        if given is not None and not all(isinstance(p, MatryoshkaProjections) for p in per_layer):
            raise fail("projections", "MatryoshkaProjections (calibrate_matryoshka), one per layer, or None",
                       type(given).__name__)

    def ranks(self, head_dim: int, head_dim_v: int) -> tuple[int, int]:
        """The key and value ranks for these head dimensions (checked: at most the dimension)."""
        def pick(explicit: int | None, dim: int) -> int:
            return explicit if explicit is not None else max(1, round((0.5 if self.fraction is None
                                                                       else self.fraction) * dim))
        rank = pick(self.rank, head_dim)
        value_rank = pick(self.value_rank if self.value_rank is not None else self.rank, head_dim_v)
        for name, r, dim in (("rank", rank, head_dim), ("value_rank", value_rank, head_dim_v)):
            if r > dim:
                raise fail(name, f"at most the head dimension {dim}", r)
        return rank, value_rank

    def compress(self, cache: KVCache, context: PressContext) -> ProjectedKVCache:
        if not isinstance(cache, KVCache) or not cache.plain:
            raise fail("cache", "a dense KVCache (MatryoshkaKV projects a cache once)", type(cache).__name__)
        d, dv = cache.keys.shape[-1], cache.values.shape[-1]
        rank, value_rank = self.ranks(d, dv)
        projections = self.projections
        if isinstance(projections, (list, tuple)):
            if context.layer is None or not 0 <= context.layer < len(projections):
                raise fail("layer", f"a layer index in [0, {len(projections)}) (projections are per layer)",
                           context.layer)
            projections = projections[context.layer]
        if projections is None:
            real = cache.occupied()
            projections = MatryoshkaProjections(*_pca(cache.keys, real, True), *_pca(cache.values, real, True))
        else:
            _check_projections(projections, cache)
        keys, values = projections.truncated(rank, value_rank)
        return ProjectedKVCache.project(cache, keys, values, self.dtype)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """Keep ``fraction`` of each head's coordinates (about that fraction of the cache's bytes); with
        ``calibration=[(q, k, v), ...]`` (one per layer) the bases are a PCA of each layer's calibration keys and
        values (:func:`calibrate_matryoshka`), else of each prompt."""
        calibration = options.pop("calibration", None)
        if calibration is not None:
            options["projections"] = tuple(calibrate_matryoshka(k, v) for _, k, v in calibration)
        return cls(fraction=fraction, **options)


def _check_projections(projections: MatryoshkaProjections, cache: KVCache) -> None:
    b, hkv, _, d = cache.keys.shape
    dv = cache.values.shape[-1]
    for basis, dim in ((projections.key_basis, d), (projections.value_basis, dv)):
        if basis.dim() != 4 or basis.shape[0] not in (1, b) or basis.shape[1:] != (hkv, dim, dim):
            raise fail("projections", f"bases of shape (1 or {b}, {hkv}, {dim}, {dim}) for this cache",
                       tuple(basis.shape))


def cayley(x: torch.Tensor) -> torch.Tensor:
    """``(I − A/2)⁻¹ (I + A/2)`` with ``A = x − xᵀ``: an orthogonal matrix for any square ``x`` (identity at 0)."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def train_matryoshka(
    projections: MatryoshkaProjections, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranks: Sequence[int],
    steps: int = 100, lr: float = 1e-2, seed: int = 0,
) -> MatryoshkaProjections:
    """Fine-tune shared projections (``G = 1``) on calibration attention ``q (N, H, L, D)``, ``k``, ``v`` (causal):
    each step draws a rank from ``ranks`` (the value rank equal, capped at ``Dv``) and takes an Adam step on the mean
    squared error between the attention output with projected keys and values and the exact one. The bases are
    ``U₀ · cayley(X)`` (exactly orthogonal throughout); the means are trained directly."""
    if projections.key_basis.shape[0] != 1:
        raise fail("projections", "shared projections (calibrate_matryoshka)", "per-sequence ones")
    if not ranks or any(not 1 <= r <= k.shape[-1] for r in ranks):
        raise fail("ranks", f"ranks in [1, {k.shape[-1]}]", list(ranks))
    gen = torch.Generator().manual_seed(seed)
    gqa = q.shape[1] != k.shape[1]
    with torch.no_grad():
        target = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rotations = [torch.zeros_like(b).requires_grad_() for b in (projections.key_basis, projections.value_basis)]
    means = [m.detach().clone().requires_grad_() for m in (projections.key_mean, projections.value_mean)]
    optimiser = torch.optim.Adam([*rotations, *means], lr=lr)

    def current() -> MatryoshkaProjections:
        return MatryoshkaProjections(projections.key_basis @ cayley(rotations[0]), means[0],
                                     projections.value_basis @ cayley(rotations[1]), means[1])

    for _ in range(steps):
        r = ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
        keys, values = current().truncated(r, min(r, v.shape[-1]))
        k_hat = keys.mean + keys.forward(k) @ keys.basis.transpose(-1, -2)
        v_hat = values.mean + values.forward(v) @ values.basis.transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k_hat, v_hat, is_causal=True, enable_gqa=gqa)
        loss = (out - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = current()
    return MatryoshkaProjections(*(t.detach() for t in (trained.key_basis, trained.key_mean, trained.value_basis,
                                                           trained.value_mean)))


register_press(
    MatryoshkaKVPress, "K10", "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection",
    "2410.14731", "keys and values kept as the first r coordinates of PCA-initialised (trainable) orthogonal bases",
    needs=("calibration",),
)
