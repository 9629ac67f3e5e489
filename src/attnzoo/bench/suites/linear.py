"""Suite ``linear`` (issue 4 and the L family): the chunked scans' scaling from N=8192 to N=65536, their speed-up over
causal SDPA at N=32768, peak memory at N=65536, decoding steps, gated delta, the hybrid methods against SDPA, and the
comparison with flash-linear-attention's naive chunked form (optional package ``fla``). Causal, B=1 H=8 D=64, fp32.
"""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_least, at_most, below

SCANS = ("linear", "lightning", "nala")
FLOORED = ("linear", "lightning")


def routing_flags(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """NaTS routing: about 10 % of the tokens (random) go to the softmax KV."""
    return {"flags": torch.rand(1, heads, n, generator=g) < 0.1}


def lcm_convolutions(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """L2ViT's two 7×7 local-concentration convolutions, small random weights."""
    return {f"lcm_{p}{i}": 0.1 * torch.randn(heads, 64, *((7, 7) if p == "weight" else ()), generator=g)
            for p in ("weight", "bias") for i in (1, 2)}


def _scan(method: str) -> Target:
    return Target(f"{method} (torch)", method, "torch")


def _scaling() -> list[Case]:
    cases = []
    for method in (*SCANS, "ecoformer"):
        for backward in (False, True):
            if method == "ecoformer" and backward:
                continue
            floors = {"scaling": at_most(10)} if method in SCANS else {}
            mode = "forward+backward" if backward else "forward"
            cases.append(Case(f"{method}_scale{'_grad' if backward else ''}",
                              f"{method} causal {mode}, time(N=65536) / time(N=8192) (ideal 8)", "scaling",
                              _scan(method), against=None, n=8192, n2=65536, causal=True, backward=backward,
                              metric="scaling", floors=floors, rounds=4 if backward else 6))
    return cases


def _vs_sdpa() -> list[Case]:
    cases = [Case(f"{m}_sdpa", f"{m} causal forward N=32768 vs causal SDPA", "compare", _scan(m), n=32768,
                  causal=True, floors={"speedup": at_least(10)}, rounds=2) for m in FLOORED]
    for m in ("nala", "ecoformer"):
        for causal in (False, True):
            for n in (2048, 8192, 32768):
                tag = "causal" if causal else "noncausal"
                cases.append(Case(f"{m}_{tag}_{n}", f"{m} {tag} forward N={n} vs SDPA", "compare", _scan(m), n=n,
                                  causal=causal, rounds=2 if n == 32768 else 3))
    return cases


def _memory() -> list[Case]:
    cases = []
    for m in (*SCANS, "ecoformer"):
        for backward in (False, True):
            floors = {"peak_gib": below(1.0)} if m in FLOORED and not backward else {}
            mode = "forward+backward (q/k/v gradients included)" if backward else "forward"
            cases.append(Case(f"{m}_memory{'_grad' if backward else ''}",
                              f"peak memory above the inputs, {m} causal {mode} N=65536 (fresh process)", "memory",
                              _scan(m), against=None, n=65536, causal=True, backward=backward, metric="peak_gib",
                              floors=floors))
    return cases


def _decode() -> list[Case]:
    return [Case(f"{m}_decode", f"{m} decode step after 1k vs after 64k prefilled tokens (one thread)", "decode",
                 Target(m, m), against=None, n=1024, n2=65536, causal=True, metric="step_ratio",
                 floors={"step_ratio": at_most(1.25)}, rounds=9, threads=1) for m in FLOORED]


def _hybrid() -> list[Case]:
    nats = Target("nats_hybrid (torch)", "nats_hybrid", "torch", tensors=routing_flags)
    cases = []
    for n in (2048, 8192, 16384):
        cases.append(Case(f"nats_{n}", f"nats_hybrid causal N={n}, 10 % routed to softmax, vs causal SDPA", "compare",
                          nats, n=n, causal=True, threads=1))
        cases.append(Case(f"nats_{n}_gated_delta", f"nats_hybrid causal N={n} vs plain gated_delta", "compare", nats,
                          against=Target("gated_delta (torch)", "gated_delta", "torch"), n=n, causal=True, threads=1))
    cases.append(Case("nats_2048_ref", "nats_hybrid causal N=2048 vs its dense reference", "compare", nats,
                      against=Target("reference", "nats_hybrid", "reference", tensors=routing_flags), n=2048,
                      causal=True, threads=1, rounds=1))
    for side in (32, 64, 128):
        n = side * side
        layout = {"layout": (side, side)}
        l2vit = Target("l2vit (torch)", "l2vit", "torch", layout, lcm_convolutions)
        cases.append(Case(f"l2vit_{n}", f"l2vit {side}×{side} with 7×7 convolutions vs SDPA", "compare", l2vit, n=n,
                          threads=1))
        cases.append(Case(f"l2vit_{n}_no_lcm", f"l2vit {side}×{side} without convolutions vs SDPA", "compare",
                          Target("l2vit (torch, no LCM)", "l2vit", "torch"), n=n, threads=1))
        if n <= 4096:
            cases.append(Case(f"l2vit_{n}_ref", f"l2vit {side}×{side} vs its dense reference", "compare", l2vit,
                              against=Target("reference", "l2vit", "reference", layout, lcm_convolutions), n=n,
                              threads=1, rounds=1))
    return cases


CASES = (
    *_scaling(),
    *_vs_sdpa(),
    *_memory(),
    *_decode(),
    Case("gated_delta_scale", "gated_delta chunked forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling",
         Target("gated_delta (torch)", "gated_delta", "torch", {"beta": 0.5}), against=None, n=8192, n2=65536,
         causal=True, metric="scaling"),
    *_hybrid(),
    Case("fla_linear", "causal linear attention N=16384 (torch) vs flash-linear-attention's naive chunked form",
         "compare", _scan("linear"), against=Target("fla naive_chunk_linear_attn", peer="fla_chunk_linear"),
         causal=True, floors={"speedup": at_least(1)}, requires="fla"),
)
