"""Suite ``titans`` (issue 15, L12): Titans' linear memory (:mod:`attnzoo.methods.linear.titans`, fast path
:mod:`attnzoo.kernels.memory_scan`). Causal, B=1 H=4 D=64, fp32, chunks of 64 tokens, the ℓ2 inner loss, per-token
gates drawn as a layer's sigmoids give them (:func:`gates`), one torch thread.

- ``titans_scale``: forward, time(N=65536) / time(N=8192); floor ≤ 10 (linear in N: ideal 8);
- ``titans_scale_grad``: the same with the backward (no floor);
- ``titans_sdpa_8k``, ``titans_sdpa_16k``: forward against causal SDPA at N=8192 and 16384 (no floor: different work,
  shown for scale; the chunked memory costs O(N·C·(C + D) + N·D²), SDPA O(N²·D));
- ``titans_mlp_scale``, ``titans_mlp_sdpa_16k``: the deep memory (``titans_mlp``, a two-layer MLP with hidden width
  2·D) the same ways (no floor);
- ``moneta_scale``, ``memora_scale``: Miras' Moneta (ℓ3 bias, ℓ4 retention) and Memora (KL retention)
  (:mod:`attnzoo.methods.linear.miras`, fast path :mod:`attnzoo.kernels.retention_scan`: a loop over tokens, the
  gradients batched per chunk), forward t(65536) / t(8192); Moneta's floor ≤ 10;
- ``moneta_sdpa_16k``, ``yaad_sdpa_16k``, ``memora_sdpa_16k``: the three Miras memories against causal SDPA at
  N=16384 (no floor);
- ``titans_decode``: one recurrent step after 1k and after 64k prefilled tokens (constant gates: a step takes no
  per-token tensors here): the state is three ``D × D`` matrices per head, so ``step_ratio`` ≤ 1.25 and
  ``bytes_ratio`` = 1.
"""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_most

HEADS = 4
PARAMS = {"chunk_size": 64, "loss": "l2"}


def gates(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-token momentum decay η, learning rate θ and forgetting α, ``(1, heads, n)``, as sigmoids of random logits."""
    return {
        "eta": torch.sigmoid(torch.randn(1, heads, n, generator=g) + 1.0),
        "theta": 0.5 * torch.sigmoid(torch.randn(1, heads, n, generator=g)),
        "alpha": torch.sigmoid(torch.randn(1, heads, n, generator=g) - 3.0),
    }


def miras_gates(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Miras' memories take no momentum: the learning rate θ and forgetting α of :func:`gates`."""
    drawn = gates(n, heads, g)
    return {"theta": drawn["theta"], "alpha": drawn["alpha"]}


def miras(method: str) -> Target:
    return Target(f"{method} (torch, chunk 64)", method, "torch", params={"chunk_size": 64}, tensors=miras_gates)


TITANS = Target("titans (torch, chunk 64)", "titans", "torch", params=PARAMS, tensors=gates)
DEEP = Target("titans_mlp (torch, chunk 64)", "titans_mlp", "torch", params=PARAMS, tensors=gates)

CASES: tuple[Case, ...] = (
    Case("titans_scale", "titans causal forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling", TITANS,
         against=None, n=8192, n2=65536, heads=HEADS, causal=True, metric="scaling", floors={"scaling": at_most(10)},
         rounds=4, threads=1),
    Case("titans_scale_grad", "titans causal forward+backward, time(N=65536) / time(N=8192) (ideal 8)", "scaling",
         TITANS, against=None, n=8192, n2=65536, heads=HEADS, causal=True, backward=True, metric="scaling",
         rounds=2, threads=1),
    Case("titans_sdpa_8k", "titans causal forward N=8192 vs causal SDPA", "compare", TITANS, n=8192, heads=HEADS,
         causal=True, rounds=5, threads=1),
    Case("titans_sdpa_16k", "titans causal forward N=16384 vs causal SDPA", "compare", TITANS, n=16384,
         heads=HEADS, causal=True, rounds=3, threads=1),
    Case("titans_mlp_scale", "titans_mlp causal forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling", DEEP,
         against=None, n=8192, n2=65536, heads=HEADS, causal=True, metric="scaling", rounds=3, threads=1),
    Case("titans_mlp_sdpa_16k", "titans_mlp causal forward N=16384 vs causal SDPA", "compare", DEEP, n=16384,
         heads=HEADS, causal=True, rounds=3, threads=1),
    Case("moneta_scale", "moneta causal forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling",
         miras("moneta"), against=None, n=8192, n2=65536, heads=HEADS, causal=True, metric="scaling",
         floors={"scaling": at_most(10)}, rounds=2, threads=1),
    Case("memora_scale", "memora causal forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling",
         miras("memora"), against=None, n=8192, n2=65536, heads=HEADS, causal=True, metric="scaling", rounds=2,
         threads=1),
    *(Case(f"{m}_sdpa_16k", f"{m} causal forward N=16384 vs causal SDPA", "compare", miras(m), n=16384, heads=HEADS,
           causal=True, rounds=3, threads=1) for m in ("moneta", "yaad", "memora")),
    Case("titans_decode", "titans decode step after 1k vs after 64k prefilled tokens (one thread)", "decode",
         Target("titans", "titans", params=PARAMS), against=None, n=1024, n2=65536, heads=HEADS, causal=True,
         metric="step_ratio", floors={"step_ratio": at_most(1.25), "bytes_ratio": at_most(1.0)}, rounds=9,
         threads=1),
)
