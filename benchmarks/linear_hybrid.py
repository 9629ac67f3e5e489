"""Figures for L11 ``nats_hybrid`` and L9 ``l2vit``: fast path vs dense reference vs SDPA (CPU, fp32, B=1, H=8, D=64).

Run: python benchmarks/linear_hybrid.py [nats|l2vit ...]  (default: both). Forward only, no autograd, one thread;
median process CPU time of ``REPEATS`` runs (steadier than wall clock on a shared machine), all cases of a length in
the same process.

- ``nats``: causal; 10 % of the tokens routed to the softmax KV (random flags), gated-delta defaults otherwise;
  against causal ``scaled_dot_product_attention`` and plain ``gated_delta`` (the dense reference only at N = 2048).
- ``l2vit``: noncausal on a square ``layout`` with 7×7 LCM convolutions (and without them, ``no_lcm``); against
  noncausal SDPA (the dense reference at N ≤ 4096).
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


def cpu_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def report(name: str, n: int, cases: dict[str, Callable[[], object]]) -> None:
    t = {label: cpu_ms(fn, 1 if label == "reference" else REPEATS) for label, fn in cases.items()}
    parts = [f"{label} {ms:8.0f} ms" for label, ms in t.items()]
    print(f"{name:12s} N={n:6d}  " + "  ".join(parts) + f"  sdpa/fast {t['sdpa'] / t['fast']:.2f}", flush=True)


def nats_row(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    flags = torch.rand(1, H, n, generator=g) < 0.1
    cases: dict[str, Callable[[], object]] = {
        "fast": lambda: az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags, backend="torch"),
        "gated_delta": lambda: az.attention(q, k, v, method="gated_delta", causal=True),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if n <= 2048:
        cases["reference"] = lambda: az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags,
                                                  backend="reference")
    report("nats_hybrid", n, cases)


def l2vit_row(side: int) -> None:
    n = side * side
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    lcm = {f"lcm_{p}{i}": 0.1 * torch.randn(H, D, *((7, 7) if p == "weight" else ()), generator=g)
           for p in ("weight", "bias") for i in (1, 2)}
    params = {"layout": (side, side), **lcm}
    cases: dict[str, Callable[[], object]] = {
        "fast": lambda: az.attention(q, k, v, method="l2vit", backend="torch", **params),
        "no_lcm": lambda: az.attention(q, k, v, method="l2vit", backend="torch"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    if n <= 4096:
        cases["reference"] = lambda: az.attention(q, k, v, method="l2vit", backend="reference", **params)
    report("l2vit", n, cases)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    for name in names or ["nats", "l2vit"]:
        if name == "nats":
            for n in (2048, 8192, 16384):
                nats_row(n)
        elif name == "l2vit":
            for side in (32, 64, 128):
                l2vit_row(side)
        else:
            raise SystemExit(f"unknown case {name!r} (nats, l2vit)")


if __name__ == "__main__":
    main(sys.argv[1:])
