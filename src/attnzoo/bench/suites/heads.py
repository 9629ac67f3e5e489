"""Suite ``heads`` (issue 15, head structure): H3 MoH's routed rows against computing every head.

- ``moh_half_4k``: MoH (``torch``: only the routed query rows of each head are attended) with every head routed and
  half of them kept per token (``top_k = 4`` of 8, weights from :func:`attnzoo.methods.heads.moh.route` on random
  router logits), against SDPA computing every head for every token (what the paper's code does before gating, minus
  the gating). B=1 H=8 N=4096 D=64, fp32, forward, noncausal. Floor: ≥ 1.5× (ideal 2×: half the rows);
- ``moh_half_4k_causal``: the same, causal, against causal SDPA (no floor);
- ``moh_half_4k_train``: the same, forward+backward (no floor);
- ``moh_shared_4k``: 2 shared heads (every token) and 2 of the 6 routed heads per token, again half of all
  (token, head) pairs, against SDPA (no floor).

Every case runs on one torch thread (``--threads`` overrides): MoH's fast path is a loop of calls per (batch, head),
and on a 2-core machine shared with other jobs two threads make such loops slower for reasons of load, not method.
"""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_least
from attnzoo.methods.heads.moh import route

N, HEADS = 4096, 8


def half_routed(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every head routed, ``heads / 2`` kept per token (random router logits)."""
    logits = torch.randn(1, n, heads, generator=g)
    return {"head_weights": route(logits, heads // 2).weights.transpose(1, 2).contiguous()}


def two_shared_quarter_routed(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """2 shared heads and ``heads / 2 − 2`` of the other ``heads − 2`` kept per token: half of all pairs."""
    routed = torch.randn(1, n, heads - 2, generator=g)
    shared, groups = torch.randn(1, n, 2, generator=g), torch.randn(1, n, 2, generator=g)
    weights = route(routed, heads // 2 - 2, 2, shared, groups).weights
    return {"head_weights": weights.transpose(1, 2).contiguous()}


MOH = Target("moh (torch, half the rows)", "moh", "torch", tensors=half_routed)

CASES: tuple[Case, ...] = (
    Case("moh_half_4k", "MoH, 4 of 8 heads per token, vs SDPA over every head, B=1 H=8 N=4096 D=64 fwd", "compare",
         MOH, n=N, heads=HEADS, floors={"speedup": at_least(1.5)}, rounds=5, threads=1),
    Case("moh_half_4k_causal", "MoH, 4 of 8 heads per token, causal, vs causal SDPA over every head, N=4096",
         "compare", MOH, n=N, heads=HEADS, causal=True, rounds=5, threads=1),
    Case("moh_half_4k_train", "MoH, 4 of 8 heads per token, fwd+bwd, vs SDPA over every head, N=4096", "compare",
         MOH, n=N, heads=HEADS, backward=True, rounds=3, threads=1),
    Case("moh_shared_4k", "MoH, 2 shared + 2 of 6 routed heads per token, vs SDPA over every head, N=4096",
         "compare", Target("moh (torch, 2 shared + 2/6 routed)", "moh", "torch", tensors=two_shared_quarter_routed),
         n=N, heads=HEADS, rounds=5, threads=1),
)
