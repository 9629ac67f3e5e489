"""Radial attention (P7) against dense SDPA at paper-like video shapes, in the same run (fp32, B=1, H=4, D=64).

The paper's regime is many latent frames (HunyuanVideo 4× length: ~128 latent frames) with its deployed mask on
128×128 blocks (``decay_factor`` 1 for HunyuanVideo, 0.2 for Wan, whose mask also keeps frame 0 dense); the speed-up
comes from frames, so the cases grow the frame count at 256 tokens per frame (16×16) and hold N = 16384 while trading
tokens per frame for frames. Times are the best of interleaved repeats (method, SDPA, method, …); the printed density
is the fraction of (query, key) pairs the fast path computes (block mask) or the mask keeps (token rule).

Usage: PYTHONPATH=src python benchmarks/radial_floors.py [--threads N] [case ...]. On a machine shared with other jobs,
``--threads 1`` gives steadier ratios: with every core busy, each small multi-threaded op (the gathers, the output
copies) can wait a scheduler slice for its second thread, which penalises the many-call sparse path far more than one
large SDPA.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.masks import dense
from attnzoo.masks.radial import radial
from attnzoo.methods.structured.radial import block_layout

HEADS = 4


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` interleaved rounds (after one untimed warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, float] = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def density(n: int, frames: int, spatial: int, text: int, first: bool, block: int | None, decay: float) -> float:
    if block is not None:
        return block_layout(n, (frames, spatial), text, first, block, decay, torch.device("cpu")).density(n, n)
    return float(dense(radial(frames, spatial, text, first, "cpu"), 1, 1, n, n, "cpu").float().mean())


def case(frames: int, spatial: int, *, block: int | None = 128, decay: float = 1.0, text: int = 0,
         first: bool = False, grad: bool = False, repeats: int = 3) -> None:
    n = frames * spatial + text
    params = dict(method="radial", layout=(frames, spatial), text_tokens=text, dense_first_frame=first,
                  block_size=block, decay_factor=decay, backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, 64, generator=g).requires_grad_(grad) for _ in range(3))

    def fast() -> None:
        out = az.attention(q, k, v, **params)
        if grad:
            out.sum().backward()

    def sdpa() -> None:
        out = F.scaled_dot_product_attention(q, k, v)
        if grad:
            out.sum().backward()

    with torch.set_grad_enabled(grad):
        times = best_of({"radial": fast, "sdpa": sdpa}, repeats)
    mask = "token rule" if block is None else f"block {block}, decay {decay}"
    what = "fwd+bwd" if grad else "fwd"
    print(f"F={frames} s={spatial} text={text} sink={first} N={n} ({mask}) {what}: density "
          f"{density(n, frames, spatial, text, first, block, decay):.3f}; sdpa {times['sdpa']:.3f}s, radial "
          f"{times['radial']:.3f}s, ratio {times['sdpa'] / times['radial']:.2f}x", flush=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(which: str, grad: bool) -> None:
    """Peak RSS above the inputs of one call at 64 × 256 (``which``: sdpa, block or token), plans built beforehand."""
    n = 64 * 256
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, 64, generator=g).requires_grad_(grad) for _ in range(3))
    params = dict(method="radial", layout=(64, 256), backend="torch", block_size=None if which == "token" else 128)

    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v) if which == "sdpa" else az.attention(q, k, v, **params)

    with torch.no_grad():
        call()  # builds and caches the method's plan (not part of a call's working memory)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    with torch.set_grad_enabled(grad):
        out = call()
        if grad:
            out.sum().backward()
    print(f"{which} {'fwd+bwd' if grad else 'fwd'} 64x256: peak {(_status_kib('VmHWM') - base) / 2**20:.3f} GiB "
          "above the inputs", flush=True)


def memory() -> None:
    """Each case in a fresh process (``/proc/self/clear_refs`` then ``VmHWM``); dense scores would be 4 GiB."""
    for which in ("sdpa", "block", "token"):
        for grad in ("0", "1"):
            subprocess.run([sys.executable, __file__, "--memory-child", which, grad], check=True)


CASES: dict[str, Callable[[], None]] = {
    # speed-up grows with frames at 256 tokens per frame (N = 8k, 16k, 32k)
    "f32": lambda: case(32, 256),
    "f64": lambda: case(64, 256),
    "f128": lambda: case(128, 256, repeats=2),
    # N = 16384 (and 16384 + text): tokens per frame traded for frames
    "s512": lambda: case(32, 512),
    "s128": lambda: case(128, 128),
    "wan": lambda: case(64, 256, decay=0.2, text=256, first=True),
    "s384": lambda: case(64, 384, repeats=2),
    # the exact token rule (tiled, element-masked)
    "token_f64": lambda: case(64, 256, block=None),
    "token_f128": lambda: case(128, 128, block=None),
    # training: forward + backward (per chunk the flash kernel's backward from the saved output and log-sum-exp)
    "grad_f64": lambda: case(64, 256, grad=True, repeats=2),
    "grad_s128": lambda: case(128, 128, grad=True, repeats=2),
    "grad_token_f64": lambda: case(64, 256, block=None, grad=True, repeats=2),
    # peak memory of the block and token paths against SDPA's
    "memory": memory,
}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--memory-child"]:
        memory_child(args[1], args[2] == "1")
        sys.exit()
    if args[:1] == ["--threads"]:
        torch.set_num_threads(int(args[1]))
        args = args[2:]
    print(f"torch threads: {torch.get_num_threads()}, B=1, H={HEADS}, D=64, fp32", flush=True)
    for name in args or list(CASES):
        CASES[name]()
