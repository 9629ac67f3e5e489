"""K9 — RotateKV: rotated, reordered 2-bit KV-cache quantisation that keeps the attention sinks in full precision.

Paper: Su et al., "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware Adaptive
Rotations", IJCAI 2025, arXiv:2501.16383 (details checked against the authors' public code, ZunhaiSu/RotateKV).

Every token of the prompt (and every token decoded after it) is stored as (cache layout: :mod:`attnzoo.kv.quantized`)

- keys: the ``C = Hkv·D`` channels of a token, rotated by the fast Walsh–Hadamard transform in blocks of
  ``head_group`` kv heads (*grouped-head rotation*, ``H_blk``, the paper's default 4 heads), then **reordered** by a
  channel order ``P`` calibrated on the prompt's rotated keys (*outlier-aware rotation*: channels sorted by their
  summed value, so channels with similar offsets share a quantisation group), then quantised:
  ``k̃ = Q(P H_blk k)``;
- values: rotated per head (``H_v``, as the paper folds into the value and output projections) and quantised:
  ``ṽ = Q(H_v v)``;
- ``Q``: asymmetric ``bits``-bit quantisation per token in groups of ``group_size`` consecutive channels of the
  flattened ``(kv_heads × head_dim)`` axis (the paper's per-token groups of 128 are one head of LLaMA's 128 channels;
  with ``head_dim < 128`` a group spans several heads; a token with fewer than ``group_size`` channels is one group;
  otherwise ``group_size`` must divide ``Hkv·D``),
  codes packed four to a byte at 2 bits, scale and zero in float16 (:mod:`attnzoo.kernels.quantize`: the error of
  every value is at most half its group's scale).
- attention sinks (*attention-sink-aware quantisation*): the first ``n_sink`` positions of each prompt stay in
  full precision (the cache's dtype).

Reading dequantises on the fly: ``k̂ = H_blk Pᵀ deq(k̃)`` (both rotations are orthonormal and their own inverse);
``out = H_v Σ_j p_j deq(ṽ_j)``. The rotations are exact (orthonormal), so the only error is the quantisation's.

Choices, where this press differs from the paper:

- *Where the rotation applies.* The paper rotates keys **before RoPE** inside the model (pre-RoPE grouped-head
  rotation) and fuses the rotations into the projection weights. A cache press sees keys as the method is given them
  (after any position encoding), so the rotation applies to those keys; nothing is fused.
- *Calibration.* The paper calibrates one channel order per layer offline; here each sequence's order is calibrated
  on its own prompt's (non-sink) keys when the press runs, so a sequence's cache does not depend on the rest of the
  batch. The authors' code sorts the channels' *signed* sums (not magnitudes); so does this press.
- *Sinks.* The paper protects the tokens carrying the layer input's largest activations (massive activations), which a
  cache press does not see; the authors' code also has the first-N rule with N = 5, used here (``n_sink = 5``).
  Tokens appended while decoding are always quantised (the paper quantises each new token the same way; there is no
  full-precision window of recent tokens).
- ``head_dim`` (and the value head dim) must be powers of two; ``head_group`` is capped to the largest power of two
  dividing the number of kv heads.

Cache bytes at 2 bits, groups of 128, ``Hkv = 8``, ``D = 64`` (per token: 144 bytes of keys, 144 of values, 4 of
position, against 2048 + 32 for a float16 cache): 0.14 of the float16 cache (``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnzoo.errors import fail
from attnzoo.kernels.hadamard import is_power_of_two
from attnzoo.kernels.quantize import BITS, check_bits
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, check_integer, register_press
from attnzoo.kv.quantized import QuantizedKVCache


@dataclass(frozen=True)
class RotateKVPress(Press):
    """Quantise the cache to ``bits`` (2, 4 or 8) in groups of ``group_size`` channels after the grouped Hadamard
    rotation of ``head_group`` kv heads and the calibrated channel reordering; the first ``n_sink`` positions stay in
    full precision."""

    bits: int = 2
    group_size: int = 128
    head_group: int = 4
    n_sink: int = 5

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_integer("group_size", self.group_size, 4, "channels per quantisation group, a multiple of 4")
        if self.group_size % 4:
            raise fail("group_size", "a multiple of 4 (whole bytes of codes per group)", self.group_size)
        check_integer("head_group", self.head_group, 1, "kv heads rotated together (a power of two)")
        if not is_power_of_two(self.head_group):
            raise fail("head_group", "a power of two (kv heads rotated together)", self.head_group)
        check_integer("n_sink", self.n_sink, 0, "leading positions kept in full precision")

    def compress(self, cache: KVCache, context: PressContext) -> QuantizedKVCache:
        return QuantizedKVCache.from_cache(cache, self.n_sink, self.bits, self.group_size, self.head_group)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """The most bits (2, 4, 8) whose codes, scales and zeros take at most ``fraction`` of a float16 cache's bytes
        (``(bits/8 + 4/group) / 2`` per value: 0.14, 0.27, 0.52 at groups of 128)."""
        group = options.get("group_size", cls.group_size)
        number = not isinstance(fraction, bool) and isinstance(fraction, (int, float))
        fits = [b for b in BITS if number and (b / 8 + 4 / group) / 2 <= fraction]
        if not fits:
            smallest = (BITS[0] / 8 + 4 / group) / 2
            raise fail("fraction", f"at least {smallest:.3f} of the float16 cache (2-bit codes with their scales)",
                       repr(fraction))
        return cls(bits=max(fits), **options)



register_press(
    RotateKVPress, "K9", "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware "
    "Adaptive Rotations", "2501.16383",
    "grouped-head Walsh–Hadamard rotation + calibrated channel reordering + 2-bit grouped quantisation; sinks kept "
    "in full precision",
)
