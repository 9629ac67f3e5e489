"""Pieces every benchmark case shares: inputs, parameters, peak memory, timing, FLOP counting.

Peak memory:
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes allocated before the
  call (the caching allocator's peak of live tensors).
- CPU: the real resident memory of the process that runs the case. Before each measured call the peak resident set
  (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0); after it, the peak is read from
  ``/proc/self/status`` and the resident set before the call is subtracted. glibc is told (``mallopt``) to serve every
  allocation of 64 KiB or more with its own ``mmap``, so freed tensors leave the resident set and one case's memory
  cannot hide in pages a previous case left behind. Where ``clear_refs`` is unavailable the peak is not reported.

In both cases the figure is the memory the call needs beyond its inputs (q, k, v, the parameters): scores, saved
activations, gradients and the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from attnzoo.registry import Call, Method

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024
TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's default
KEPT_HEAP_BYTES = 256 * 1024 * 1024
CLEAR_REFS = "/proc/self/clear_refs"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (``find_library`` runs a subprocess), or None where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _mallopt(settings: dict[int, int]) -> None:
    libc = _libc()
    try:
        for option, value in settings.items():
            libc.mallopt(option, value)  # type: ignore[union-attr]
    except AttributeError:  # no C library, or one without glibc's mallopt
        return


def setup_process() -> None:
    """Make the resident set track live tensors (see the module docstring). Safe to call more than once."""
    _mallopt({M_MMAP_THRESHOLD: MMAP_THRESHOLD_BYTES, M_TRIM_THRESHOLD: TRIM_THRESHOLD_BYTES})


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    """For code that is timed, not memory-measured (a quality case's training loop, a suite's timing case): let glibc
    keep freed blocks up to 256 MiB in its heap instead of unmapping them, then trim the heap and restore
    :func:`setup_process`'s tracking. Code that reallocates the same tensors on every call otherwise maps and faults
    them in anew each time. Measured in a worker (MQAR 16 pairs, width 64, ``moba``, one thread): 36.9 s of training
    with 12.9 M page faults and 18.6 s of system time under the tracking threshold, against 18 s in a plain process.
    A fresh 128 MiB output (Aaren at N=65536) costs 32.8 k page faults and 54 ms per call at glibc's defaults, which
    always map blocks over 32 MiB, against 13.1 k faults and 20 ms in the kept heap."""
    _mallopt({M_MMAP_THRESHOLD: KEPT_HEAP_BYTES, M_TRIM_THRESHOLD: KEPT_HEAP_BYTES})
    try:
        yield
    finally:
        setup_process()
        _trim()


def _trim() -> None:
    try:
        _libc().malloc_trim(0)  # type: ignore[union-attr]
    except AttributeError:  # no C library, or one without glibc's malloc_trim
        return


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes used by one call above what was live before it, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = True
        if device.type == "cpu":
            try:
                with open(CLEAR_REFS, "w") as f:
                    f.write("5")
                _status_kib("VmHWM")
            except OSError:
                self.available = False
        self._base = 0

    @staticmethod
    def source(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the bytes allocated before the call"
        return (
            "peak resident set (VmHWM) of the process running the case, reset before each call through "
            "/proc/self/clear_refs, minus the resident set before the call"
        )

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            _trim()
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if not self.available:
            return None
        return max(0, _status_kib("VmHWM") * 1024 - self._base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call of ``fn`` (synchronised before and after on a GPU): the one timer of the benchmark."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Times of each function over ``rounds`` rounds, one call of each per round (a, b, a, b, ...), after ``warmup``
    untimed calls each: on a machine shared with other jobs, interleaving makes load hit the compared calls alike, and
    the best of the rounds is the least-disturbed estimate (what the suites report)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def spread(times: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of repeat times (seconds)."""
    xs = sorted(times)
    n = len(xs)

    def quantile(p: float) -> float:
        pos = p * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "time_median_s": quantile(0.5),
        "time_min_s": xs[0],
        "time_max_s": xs[-1],
        "time_iqr_s": quantile(0.75) - quantile(0.25),
    }


def make_call(shape: dict[str, Any], causal: bool, requires_grad: bool) -> Call:
    return Call(
        batch=shape["batch"], heads=shape["heads"], kv_heads=shape["kv_heads"], seq_q=shape["seq_q"],
        seq_kv=shape["seq_kv"], head_dim=shape["head_dim"], head_dim_v=shape.get("head_dim_v", shape["head_dim"]),
        causal=causal, device=torch.device(shape["device"]), dtype=getattr(torch, shape["dtype"]),
        requires_grad=requires_grad, has_mask=False, has_bias=False,
    )


def make_qkv(
    shape: dict[str, Any], seed: int, requires_grad: bool = False, qk_std: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q (B, H, Sq, D)``, ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)`` from a fixed seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, shape["dtype"])
    b, h, hkv, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    dv = shape.get("head_dim_v", d)
    q = torch.randn(b, h, shape["seq_q"], d, generator=g) * qk_std
    k = torch.randn(b, hkv, shape["seq_kv"], d, generator=g) * qk_std
    v = torch.randn(b, hkv, shape["seq_kv"], dv, generator=g)
    out = tuple(t.to(device=shape["device"], dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v))
    return out  # type: ignore[return-value]


def method_params(method: Method, call: Call, seed: int) -> list[dict[str, Any]]:
    """Parameter sets to try for ``call``, best first: the method's defaults, then its test hints' sample.

    ``spec.tests.sample_params`` gives valid values for any shape (learnable tensors among them); where it also picks
    plain values (a window, a rank) and the spec has a default for them, the default is tried first, since that is what
    a user gets. Learnable float tensors are made to require gradients when the call does.
    """
    hints = method.spec.tests.sample_params
    if hints is None:
        return [{}]
    g = torch.Generator(device="cpu").manual_seed(seed)
    sampled = dict(hints(call, g))
    for name, value in sampled.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to(call.device)
            if value.is_floating_point():
                value = value.to(call.dtype).requires_grad_(call.requires_grad)
            sampled[name] = value
    defaults = {
        name: value
        for name, value in sampled.items()
        if isinstance(value, torch.Tensor) or _default_of(method, name) is None
    }
    return [defaults, sampled] if defaults.keys() != sampled.keys() else [sampled]


def _default_of(method: Method, name: str) -> Any:
    try:
        return method.spec.param(name).default
    except KeyError:
        return None


def describe_params(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly view of parameters: tensors as their shape."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            out[name] = f"tensor{list(value.shape)}"
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        else:
            out[name] = repr(value)
    return out


def softmax_flops(call: Call, backward: bool) -> int:
    """Matmul FLOPs of softmax attention: ``2·B·H·pairs·(D + Dv)`` forward (pairs = visible query-key pairs), and twice
    that again for the backward pass (dQ, dK, dV, dP)."""
    sq, skv = call.seq_q, call.seq_kv
    if call.causal:
        offset = skv - sq
        # query i sees keys 0..i+offset, clipped to [0, skv]
        pairs = sum(min(skv, max(0, i + offset + 1)) for i in range(sq))
    else:
        pairs = sq * skv
    fwd = 2 * call.batch * call.heads * pairs * (call.head_dim + call.head_dim_v)
    return 3 * fwd if backward else fwd


def _cpu_sdpa_flops(name: str, args: Any) -> int:
    """FLOPs of PyTorch's CPU flash-attention op (no formula in ``torch.utils.flop_counter``): ``2·B·H·pairs·(D+Dv)``
    forward (causal self-attention counting half the pairs), twice that backward."""
    backward = name.endswith("_backward")
    q, k, v = args[1:4] if backward else args[0:3]
    is_causal = args[7] if backward else (args[4] if len(args) > 4 else False)
    b, h, sq, d = q.shape
    skv, dv = k.shape[-2], v.shape[-1]
    pairs = sq * skv // 2 if is_causal and sq == skv else sq * skv
    fwd = 2 * b * h * pairs * (d + dv)
    return 2 * fwd if backward else fwd


class _FlopCount(TorchDispatchMode):
    """Adds up the FLOPs of the ops ``torch.utils.flop_counter`` has formulas for (matmuls, convolutions, fused
    attention) and of PyTorch's CPU flash attention, running everything else as is. Unlike ``FlopCounterMode`` it does
    not decompose every other op into primitives to look inside it, which slows the counted call tenfold."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        elif "_scaled_dot_product_flash_attention_for_cpu" in str(packet):
            self.total += _cpu_sdpa_flops(str(packet), args)
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul-like ops (see :class:`_FlopCount`) that run while ``fn`` runs."""
    with _FlopCount() as counter:
        fn()
    return counter.total
