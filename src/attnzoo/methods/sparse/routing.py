"""D5 — Routing attention: online k-means centroids shared by queries and keys; each cluster's queries attend to the
same cluster's keys.

Paper: "Efficient Content-Based Sparse Attention with Routing Transformers" (Roy, Saffar, Vaswani & Grangier,
arXiv:2003.05997); code google-research/google-research ``routing_transformer/utils.py``
(``clustered_local_attention_helper``, ``gather_cluster_attention_items``, ``cluster_items``, ``online_kmeans``).

Formula as implemented. Queries and keys are layer-normalised without gain or bias (``x̂ = (x − mean) / sqrt(var +
1e-6)`` over the head dim, as the code's ``layer_norm(·, scaling=False)``) and scored against ``C`` centroids
``μ_c`` shared by queries and keys, per query head (``centroids (H, C, D)``; a GQA group's keys are scored against
each of its query heads' centroids): ``r_c(x) = x̂·μ_c`` (the code's distance is ``−x̂·μ_c``). Clusters are
*balanced* as in the code: cluster ``c`` holds the ``w_q`` queries and the ``w_k`` keys of highest ``r_c``
(``tf.math.top_k`` per centroid over the sequence, then sorted by position), with ``w = ⌈S / C⌉`` by default
(``window`` sets it). Within cluster ``c`` each of its queries attends, with one softmax, to the cluster's keys::

    O_i^c = softmax_{j ∈ K_c, j ≤ i + Skv − Sq (causal)}(scale · q_i·k_j) V          for i ∈ Q_c
    O_i   = mean over the clusters c ∋ i in which i sees a key of O_i^c              (0 if there is none)

A query may lie in several clusters or in none (top-w per centroid is not a partition); the code scatters each
cluster's outputs back and divides by the number of clusters holding the query (plus 1e-2, against division by zero):
here the exact mean, over the clusters in which the query sees at least one key (a causal query may see no key of its
cluster). The causal variant masks by *position* (``j ≤ i``); the code's lower triangle over the cluster's slots is the
same thing when queries and keys are shared (``share_qk``), and this is that rule for separate q and k. No key after a
query is ever read, but which tokens a cluster holds is decided over the whole sequence (top-w per centroid), so a
token's clusters — a discrete choice, with no gradient — may depend on later tokens, as in the paper's training. For
the same reason there is no decoder: as the sequence grows the clusters change, and a step could not equal the
forward.

Centroids are a tensor passed in (learnable part owned by ``az.nn.Attention``: ``init`` draws ``LN(N(0, 1))`` as the
code does); the forward only reads them, through ``top_k``, so it is deterministic given the centroids and gives them
no gradient. They learn by the paper's online k-means: :func:`update_centroids` (``μ_c ← λ μ_c + (1 − λ) · mean of
the normalised queries and keys whose nearest centroid is c``; centroids with no member keep their value; the paper
writes it with sums over the queries and keys, the code keeps running sums and counts: this is the per-batch mean,
the same fixed point). Call it after a training step, under ``torch.no_grad()``, with that step's q and k, and copy
the result into the layer's ``centroids``. ``centroids=None`` draws them from ``seed`` with ``num_clusters``.
Scores are computed in float32 on detached inputs, so an fp32 and an fp64 call pick the same clusters.

:func:`clusters` returns the members (positions of each cluster's queries and keys), the method's inspectable
selection. Reference (:func:`reference`): the same clusters, then per cluster a dense masked softmax over the mask
"query in ``Q_c``, key in ``K_c`` (and causal)", averaged as above. Fast path ``torch`` (:func:`torch_clustered`):
queries, keys and values gathered cluster by cluster into equal blocks ``(B, H, C, w, ·)`` and attended by one batched
fused-attention call (a position mask when causal), then scattered back and averaged: time ``O(N·w·d + N·C·d)`` —
``O(N^1.5·d)`` with ``C ~ √N`` — and memory ``O(N·w)``. Not the shared
:func:`~attnzoo.kernels.block_sparse.selected_attention`: over permuted tokens a cluster is a diagonal block, but its
causal mask is by the tokens' original positions (not a triangle of the permuted order) and the clusters' outputs are
averaged, which a block selection cannot say; equal blocks need no selection machinery anyway. No log-sum-exp
(``return_lse`` raises): a query in several clusters gets the mean of one softmax per cluster, not one softmax over a
set of keys.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.methods.common import dense_scores, repeat_kv
from attnzoo.registry import ALL_PATTERNS, Backend, Call, LayerInfo, MethodSpec, Param, TestHints, register

EPS = 1e-6  # the layer norm's epsilon (the code's layer_norm default)


def _check_centroids(value: torch.Tensor, call: Call) -> str | None:
    ok = value.dim() == 3 and value.shape[0] == call.heads and value.shape[2] == call.head_dim and value.shape[1] > 0
    return None if ok else f"a tensor of shape ({call.heads}, clusters, {call.head_dim})"


@functools.lru_cache(maxsize=32)
def _drawn(heads: int, clusters: int, dim: int, seed: int) -> torch.Tensor:
    """Seeded centroids ``LN(N(0, 1))`` ``(heads, clusters, dim)`` in fp64 on the CPU (the code's initialiser)."""
    gen = torch.Generator().manual_seed(seed)
    return normalise(torch.randn(heads, clusters, dim, generator=gen, dtype=torch.float64))


def _init(info: LayerInfo) -> torch.Tensor:
    clusters, seed = info.params.get("num_clusters", 16), info.params.get("seed", 0)
    return _drawn(info.heads, clusters, info.head_dim, seed).float()


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    clusters = int(torch.randint(1, 6, (), generator=generator))
    window = int(torch.randint(1, 9, (), generator=generator)) if bool(torch.rand((), generator=generator) < 0.5) \
        else None
    centroids = torch.randn(call.heads, clusters, call.head_dim, generator=generator)
    return {"centroids": centroids.to(call.device, call.dtype), "window": window}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """``1 / fraction`` clusters: a query sees one cluster's ``⌈Skv / C⌉`` keys (about one cluster per query)."""
    return {"num_clusters": max(1, round(1 / fraction))}


SPEC = MethodSpec(
    name="routing",
    family="sparse",
    mechanism="D5",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    arxiv="2003.05997",
    summary="online k-means centroids shared by Q and K; each cluster's top-w queries attend to its top-w keys",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("centroids", (torch.Tensor,), None, "(H, C, D) k-means centroids shared by queries and keys (learned "
              "by update_centroids); None: drawn from seed", check=_check_centroids, init=_init),
        Param("num_clusters", (int,), 16, "clusters C when centroids is None", low=1),
        Param("window", (int,), None, "queries and keys per cluster (clamped to the sequence); None: ⌈S / C⌉", low=1),
        Param("seed", (int,), 0, "seed of the drawn centroids"),
    ),
    complexity="O(N·w·d + N·C·d) time with w = N/C (O(N^1.5·d) at C ~ √N), O(N·w) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the last dim without gain or bias: ``(x − mean) / sqrt(var + 1e-6)``."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def _centroids(centroids: torch.Tensor | None, heads: int, dim: int, num_clusters: int, seed: int) -> torch.Tensor:
    return _drawn(heads, num_clusters, dim, seed) if centroids is None else centroids


def _routes(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``r_c(x) = x̂·μ_c`` in float32 on detached inputs: ``x (B, H, S, D)`` → ``(B, H, C, S)``."""
    return centroids.detach().float().to(x.device) @ normalise(x.detach().float()).transpose(-1, -2)


def clusters(q: torch.Tensor, k: torch.Tensor, centroids: torch.Tensor, window: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The members of each cluster: ``(queries (B, H, C, w_q), keys (B, H, C, w_k))`` positions, ascending — the
    ``w`` queries and keys of highest ``x̂·μ_c`` (``w = min(window, S)``, default ``⌈S / C⌉``; ties go to
    ``torch.topk``). ``centroids (H, C, D)``; a GQA group's keys are ranked per query head."""
    heads, c = q.shape[1], centroids.shape[1]

    def members(x: torch.Tensor) -> torch.Tensor:
        s = x.shape[2]
        w = min(s, -(-s // c) if window is None else window)
        return _routes(x, centroids).topk(w, dim=-1).indices.sort(dim=-1).values

    return members(q), members(repeat_kv(k, heads))


def update_centroids(centroids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, decay: float = 0.999
                     ) -> torch.Tensor:
    """One online k-means step (the paper's exponential moving average): every normalised query and key (of ``q (B,
    H, Sq, D)``, ``k (B, Hkv, Skv, D)``; GQA keys count for each query head of their group) goes to its nearest
    centroid by ``x̂·μ``, and ``μ_c ← decay·μ_c + (1 − decay)·(mean of its members)``; a centroid with no member keeps
    its value. Returns the new ``(H, C, D)`` centroids (float32 math, ``centroids``' dtype; no gradient)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise fail("decay", "a number in [0, 1]", repr(decay))
    with torch.no_grad():
        x = normalise(torch.cat([q.float(), repeat_kv(k, q.shape[1]).float()], dim=2))  # (B, H, S, D)
        mu = centroids.float().to(x.device)
        nearest = F.one_hot((x @ mu.transpose(-1, -2)).argmax(-1), mu.shape[1]).float()  # (B, H, S, C)
        sums = torch.einsum("bhsc,bhsd->hcd", nearest, x)
        counts = nearest.sum(dim=(0, 2)).unsqueeze(-1)  # (H, C, 1)
        moved = decay * mu + (1 - decay) * sums / counts.clamp(min=1)
        return torch.where(counts > 0, moved, mu).to(centroids.dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, centroids: torch.Tensor | None, num_clusters: int, window: int | None, seed: int,
) -> torch.Tensor:
    b, h, sq, d = q.shape
    skv = k.shape[2]
    mu = _centroids(centroids, h, d, num_clusters, seed)
    queries, keys = clusters(q, k, mu, window)
    c = mu.shape[1]
    in_q = torch.zeros(b, h, c, sq, dtype=torch.bool, device=q.device).scatter(3, queries, True)
    in_k = torch.zeros(b, h, c, skv, dtype=torch.bool, device=q.device).scatter(3, keys, True)
    seen = in_q.unsqueeze(-1) & in_k.unsqueeze(-2)  # (B, H, C, Sq, Skv): same cluster
    if causal:
        seen = seen & torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
    s = dense_scores(q, k, scale).unsqueeze(2).masked_fill(~seen, float("-inf"))
    some = seen.any(-1, keepdim=True)  # (B, H, C, Sq, 1): the query is in the cluster and sees a key there
    p = torch.softmax(s.masked_fill(~some, 0.0), dim=-1) * some
    per_cluster = p @ repeat_kv(v, h).unsqueeze(2)  # (B, H, C, Sq, Dv)
    return per_cluster.sum(2) / some.sum(2).clamp(min=1)


def torch_clustered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, centroids: torch.Tensor | None, num_clusters: int, window: int | None, seed: int,
) -> torch.Tensor:
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    mu = _centroids(centroids, h, d, num_clusters, seed)
    queries, keys = clusters(q, k, mu, window)  # (B, H, C, w_q), (B, H, C, w_k)
    c, wq, wk = mu.shape[1], queries.shape[-1], keys.shape[-1]
    batch = torch.arange(b, device=q.device).view(b, 1, 1)
    head = torch.arange(h, device=q.device).view(1, h, 1)
    kv_head = head // (h // hkv)
    # each cluster's queries, keys and values as equal blocks (B·H, C, w, ·)
    qc = q[batch, head, queries.view(b, h, -1)].view(b * h, c, wq, d)
    kc = k[batch, kv_head, keys.view(b, h, -1)].view(b * h, c, wk, d)
    vc = v[batch, kv_head, keys.view(b, h, -1)].view(b * h, c, wk, dv)
    attn_mask, some = None, None
    if causal:  # by original position: key j seen by query i iff j ≤ i + Skv − Sq
        seen = keys.view(b * h, c, 1, wk) <= queries.view(b * h, c, wq, 1) + (skv - sq)
        some = seen.any(-1, keepdim=True)  # (B·H, C, w_q, 1)
        attn_mask = seen | ~some  # a row that sees nothing attends to all (then zeroed), never NaN
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=attn_mask, scale=scale)  # (B·H, C, w_q, Dv)
    weight = torch.ones(b * h, c, wq, 1, dtype=out.dtype, device=q.device) if some is None else some.to(out.dtype)
    rows = queries.view(b, h, c * wq, 1)
    total = out.new_zeros(b, h, sq, dv).scatter_add(2, rows.expand(b, h, c * wq, dv), (out * weight).view(b, h, -1, dv))
    count = out.new_zeros(b, h, sq, 1).scatter_add(2, rows, weight.view(b, h, -1, 1))
    return total / count.clamp(min=1)


register(SPEC, reference, [Backend("torch", torch_clustered)])
