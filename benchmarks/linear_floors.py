"""Issue-4 performance floors of the linear scans (L1 ``linear`` elu+1, L2 ``lightning``): CPU, fp32, B=1, H=8, D=64.

Run: python benchmarks/linear_floors.py [--methods linear,lightning,...] [scale|sdpa|memory|decode|delta ...]
(default: all parts, methods ``linear`` and ``lightning``; any causal L method with ``prefill``/``step`` works).

- ``scale``: forward and forward+backward time at N=8192 and N=65536 and their ratio (linear is 8; floor ≤ 10).
  The lengths alternate, best of several rounds, wall clock and process CPU time (the least-disturbed run is the
  steadiest estimate on a machine shared with other jobs); gradients are set to None after each step.
- ``sdpa``: causal forward at N=32768 against causal ``scaled_dot_product_attention`` in the same run (floor ≥ 10×).
- ``memory``: peak resident memory of the forward, and of forward+backward, at N=65536 above the inputs, each case in a
  fresh child process (``/proc/self/clear_refs`` then ``VmHWM``, as in ``core_floors.py``); features, outputs and
  gradients count (floor < 1 GiB for the forward).
- ``decode``: time of one recurrent ``step`` after a prefill of 1k and of 64k tokens (the state has a fixed size).
- ``delta``: L10 ``gated_delta`` chunked forward at N=8192 and N=65536 (linear scaling check).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

H, D = 8, 64
METHODS: tuple[str, ...] = ("linear", "lightning")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` (wall seconds, process CPU seconds) after one warm-up: on a machine shared with other jobs
    the least-disturbed run is the steadiest estimate."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def qkv(n: int, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def scale() -> None:
    """The two lengths are timed alternately (best of the rounds), so both see the same machine conditions."""
    import attnzoo as az

    for m in METHODS:
        for label, grad in (("fwd", False), ("fwd+bwd", True)):
            inputs = {n: qkv(n, grad) for n in (8192, 65536)}

            def run(n: int, grad: bool = grad, m: str = m, inputs: dict = inputs) -> None:
                q, k, v = inputs[n]
                with torch.set_grad_enabled(grad):
                    out = az.attention(q, k, v, method=m, causal=True)
                    if grad:
                        out.sum().backward()
                        for t in (q, k, v):
                            t.grad = None  # a training step's zero_grad(set_to_none=True)

            best = {n: timed(lambda n=n: run(n), 1) for n in inputs}
            for _ in range(4 if grad else 6):
                for n in inputs:
                    w, c = timed(lambda n=n: run(n), 1)
                    best[n] = (min(best[n][0], w), min(best[n][1], c))
            (w8, c8), (w64, c64) = best[8192], best[65536]
            print(f"{m} {label}: N=8192 {w8:.3f}s, N=65536 {w64:.3f}s; wall ratio {w64 / w8:.2f}, "
                  f"CPU-time ratio {c64 / c8:.2f}", flush=True)


def sdpa() -> None:
    import attnzoo as az

    q, k, v = qkv(32768)
    with torch.no_grad():
        ours = {m: timed(lambda m=m: az.attention(q, k, v, method=m, causal=True), 5)[0] for m in METHODS}
        base = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3)[0]
    for m in METHODS:
        print(f"N=32768 causal: {m} {ours[m]:.3f}s, SDPA {base:.2f}s, speed-up {base / ours[m]:.1f}x", flush=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, grad: bool) -> None:
    import attnzoo as az

    q, k, v = qkv(65536, grad)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    with torch.set_grad_enabled(grad):
        out = az.attention(q, k, v, method=method, causal=True)
        if grad:
            out.sum().backward()
    print(json.dumps({"extra_gib": (_status_kib("VmHWM") - base) / 2**20}))


def memory() -> None:
    """Forward, then forward+backward (the gradients of q, k, v are 0.375 GiB of the latter)."""
    for m in METHODS:
        for label, grad in (("forward", "0"), ("forward+backward", "1")):
            out = subprocess.run([sys.executable, __file__, "--child", m, grad], capture_output=True, text=True,
                                 check=True)
            print(f"{m} {label} N=65536: peak {json.loads(out.stdout)['extra_gib']:.3f} GiB above the inputs",
                  flush=True)


def decode() -> None:
    """One thread (a decoding step is a few tiny ops); the two positions are timed alternately, best of 9 rounds."""
    from attnzoo.methods.linear import lightning, linear

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for m, mod in (("linear", linear), ("lightning", lightning)):
        states = {}
        for n in (1024, 65536):
            q, k, v = qkv(n)
            with torch.no_grad():
                states[n] = mod.prefill(q, k, v)[1]
        one = [t[:, :, :1].contiguous() for t in qkv(1)]
        best = {n: float("inf") for n in states}
        with torch.no_grad():
            for _ in range(9):
                for n, state in states.items():
                    t = time.perf_counter()
                    s = state
                    for _ in range(50):
                        _, s = mod.step(s, *one)
                    best[n] = min(best[n], (time.perf_counter() - t) / 50)
        print(f"{m} decode step (1 thread): after 1k tokens {best[1024] * 1e6:.0f} us, after 64k "
              f"{best[65536] * 1e6:.0f} us (state {tuple(states[1024].shape)})", flush=True)
    torch.set_num_threads(threads)


def delta() -> None:
    import attnzoo as az

    res = {}
    for n in (8192, 65536):
        q, k, v = qkv(n)
        with torch.no_grad():
            res[n] = timed(lambda q=q, k=k, v=v: az.attention(q, k, v, method="gated_delta", causal=True, beta=0.5), 3)
    (w8, c8), (w64, c64) = res[8192], res[65536]
    print(f"gated_delta fwd: N=8192 {w8:.3f}s, N=65536 {w64:.3f}s; wall ratio {w64 / w8:.2f}, CPU-time ratio "
          f"{c64 / c8:.2f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "1")
    else:
        args = sys.argv[1:]
        if "--methods" in args:
            i = args.index("--methods")
            METHODS = tuple(args[i + 1].split(","))
            del args[i : i + 2]
        parts = {"scale": scale, "sdpa": sdpa, "memory": memory, "decode": decode, "delta": delta}
        for name in args or list(parts):
            parts[name]()
