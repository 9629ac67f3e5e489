"""Figures for L11 ``nats_hybrid`` and L9 ``l2vit``: fast path vs dense reference vs SDPA (CPU, fp32, B=1, H=8, D=64).

Run: python benchmarks/linear_hybrid.py [nats|l2vit ...]  (default: both). Forward only, no autograd; median of
``REPEATS`` runs of wall-clock time, all cases of a length in the same process.

- ``nats``: causal; 10 % of the tokens routed to the softmax KV (random flags), gated-delta defaults otherwise;
  against causal ``scaled_dot_product_attention`` (the dense reference only where it fits: N ≤ 2048).
- ``l2vit``: noncausal on a square ``layout`` with 7×7 LCM convolutions; against noncausal SDPA (reference N ≤ 4096).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnzoo as az

H, D, REPEATS = 8, 64, 3


def median_time(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, n: int, cases: dict[str, Callable[[], object]]) -> None:
    t = {label: median_time(fn) for label, fn in cases.items()}
    parts = [f"{label} {sec * 1e3:9.1f} ms" for label, sec in t.items()]
    ratios = [f"sdpa/fast {t['sdpa'] / t['fast']:.2f}"] + (
        [f"ref/fast {t['reference'] / t['fast']:.1f}"] if "reference" in t else [])
    print(f"{name:12s} N={n:6d}  " + "  ".join(parts + ratios), flush=True)


def nats() -> None:
    for n in (1024, 2048, 8192, 16384):
        nats_row(n)


def nats_row(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    flags = torch.rand(1, H, n, generator=g) < 0.1
    cases: dict[str, Callable[[], object]] = {
        "fast": lambda: az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags, backend="torch"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if n <= 2048:
        cases["reference"] = lambda: az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags,
                                                  backend="reference")
    with torch.no_grad():
        row("nats_hybrid", n, cases)


def l2vit() -> None:
    for side in (32, 64, 128):
        l2vit_row(side)


def l2vit_row(side: int) -> None:
    n = side * side
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    lcm = {f"lcm_{p}{i}": 0.1 * torch.randn(H, D, *((7, 7) if p == "weight" else ()), generator=g)
           for p in ("weight", "bias") for i in (1, 2)}
    params = {"layout": (side, side), **lcm}
    cases: dict[str, Callable[[], object]] = {
        "fast": lambda: az.attention(q, k, v, method="l2vit", backend="torch", **params),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    if n <= 4096:
        cases["reference"] = lambda: az.attention(q, k, v, method="l2vit", backend="reference", **params)
    with torch.no_grad():
        row("l2vit", n, cases)


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["nats", "l2vit"]
    for name in chosen:
        {"nats": nats, "l2vit": l2vit}[name]()
