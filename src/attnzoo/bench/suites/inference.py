"""Suite ``inference``: exact inference accelerators (issue 13's floors).

- ``hydragen_64x8192``, ``hydragen_8x1024``, ``hydragen_64x256``: K11 Hydragen
  (:func:`attnzoo.kv.shared_prefix_attention`, ``path="shared"``) for ``batch`` sequences sharing a prefix of
  ``n`` tokens, each with its own suffix of :data:`SUFFIX` tokens, one decode query per sequence, against SDPA over
  each sequence's own full cache (the prefix copied per sequence, as an engine without sharing holds it; built before
  timing). Floor at 64 × 8192: ≥ 10×; the two smaller shapes show where sharing stops paying (no floor), and each
  case's description says which path ``auto`` takes there;
- ``hydragen_tree``: the two-level tree (:func:`attnzoo.kv.tree_prefix_attention`: a prefix of ``n`` = 4096
  tokens shared by 64 sequences, :data:`GROUPS` sub-prefixes of :data:`SUB_PREFIX` tokens each shared by 8) against
  one level (the same call with only the prefix shared, each sequence holding its sub-prefix in its suffix): ≥ 1.5×;
- ``merge_halves_4k``: attention over each half of the keys at N = 4096 (the flash kernel, which returns the
  log-sum-exp) merged by :func:`attnzoo.merge`, against SDPA over all the keys: splitting and merging costs ≤ 10 %;
- ``mac_decode_hit``, ``mac_decode_miss``: K12 MAC-Attention (:func:`attnzoo.kv.mac_step`) decoding
  :data:`MAC_STEPS` tokens after a prompt of ``n`` tokens, against ``attnzoo.step`` softmax decoding of the same
  tokens: every decode query repeats the last prompt query (hit rate 1 at threshold 0.95), or the threshold is
  above 1 (hit rate 0: MAC's exact path). No floor: the figures are recorded.

Each side is a :class:`~attnzoo.bench.suites.Target` whose ``workload`` builds, from the case's shape
(``batch``, ``heads``, ``n``, ``head_dim``; fp32, ``randn`` from seed 0), the call the ``compare`` measure times.
Every case runs on one torch thread (``--threads`` overrides): the shared path is a loop of calls per KV head, and on
a 2-core machine shared with other jobs two threads make such loops many times slower (each call waits for the
descheduled thread), which would measure the machine's load rather than the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.suites import Case, Target, at_least, at_most
from attnzoo.kernels.dense import flash_cpu
from attnzoo.kv import MACState, mac_prefill, mac_step, shared_prefix_attention, tree_prefix_attention
from attnzoo.kv.shared_prefix import auto_path

SUFFIX = 128  # each sequence's own tokens after the shared prefix
GROUPS = 8  # sub-prefixes of the two-level tree
SUB_PREFIX = 1024  # tokens of each sub-prefix
MAC_STEPS = 16  # decode steps per timed call of the MAC cases

Call = Callable[[], Any]


def _randn(g: torch.Generator, device: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device)


def _prefix_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """One decode query per sequence, the shared prefix (``n`` tokens) and the per-sequence suffixes."""
    g = torch.Generator().manual_seed(0)
    b, h, p, d = case.batch, case.heads, case.n, case.head_dim
    return {"q": _randn(g, device, b, h, 1, d), "prefix_k": _randn(g, device, 1, h, p, d),
            "prefix_v": _randn(g, device, 1, h, p, d), "suffix_k": _randn(g, device, b, h, SUFFIX, d),
            "suffix_v": _randn(g, device, b, h, SUFFIX, d)}


def shared_prefix_call(case: Case, device: str) -> Call:
    """Hydragen's shared path on the case's batch sharing a prefix of ``n`` tokens."""
    x = _prefix_inputs(case, device)
    return lambda: shared_prefix_attention(**x, path="shared")


def full_cache_sdpa_call(case: Case, device: str) -> Call:
    """SDPA of each sequence's query over its own ``[prefix; suffix]`` cache, built once before timing."""
    x = _prefix_inputs(case, device)
    b = case.batch
    k = torch.cat([x["prefix_k"].expand(b, -1, -1, -1), x["suffix_k"]], dim=2)
    v = torch.cat([x["prefix_v"].expand(b, -1, -1, -1), x["suffix_v"]], dim=2)
    return lambda: F.scaled_dot_product_attention(x["q"], k, v)


def _tree_inputs(case: Case, device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The prefix inputs, the :data:`GROUPS` sub-prefixes (keys, values) and each sequence's group."""
    x = _prefix_inputs(case, device)
    g = torch.Generator().manual_seed(1)
    shape = (GROUPS, case.heads, SUB_PREFIX, case.head_dim)
    sub = torch.stack([_randn(g, device, *shape), _randn(g, device, *shape)])
    groups = torch.arange(case.batch, device=device) * GROUPS // case.batch
    return x, sub, groups


def tree_call(case: Case, device: str) -> Call:
    """The two-level tree: the prefix shared by the batch, each sub-prefix by its group."""
    x, sub, groups = _tree_inputs(case, device)
    return lambda: tree_prefix_attention(x["q"], x["prefix_k"], x["prefix_v"], sub[0], sub[1], groups,
                                         x["suffix_k"], x["suffix_v"])


def one_level_call(case: Case, device: str) -> Call:
    """One level: only the prefix shared; each sequence holds its group's sub-prefix in front of its suffix."""
    x, sub, groups = _tree_inputs(case, device)
    suffix_k = torch.cat([sub[0][groups], x["suffix_k"]], dim=2)
    suffix_v = torch.cat([sub[1][groups], x["suffix_v"]], dim=2)
    return lambda: shared_prefix_attention(x["q"], x["prefix_k"], x["prefix_v"], suffix_k, suffix_v, path="shared")


def halves_merged_call(case: Case, device: str) -> Call:
    """Attention of the case's ``(q, k, v)`` over each half of the keys (the flash kernel, with its log-sum-exp), the
    two merged by :func:`attnzoo.merge`: what splitting the keys costs over one call on all of them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(g, device, case.batch, case.heads, case.n, case.head_dim) for _ in range(3))
    half = case.n // 2
    scale = case.head_dim ** -0.5

    def call() -> torch.Tensor:
        parts = [flash_cpu(q, k[:, :, keys], v[:, :, keys], scale=scale)[:2]
                 for keys in (slice(None, half), slice(half, None))]
        return az.merge(parts)[0]

    return call


def _decode_inputs(case: Case, device: str) -> tuple[torch.Tensor, ...]:
    """A prompt of ``n`` tokens ``(q, k, v)`` and one decode token whose query repeats the prompt's last query."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(g, device, case.batch, case.heads, case.n, case.head_dim) for _ in range(3))
    token = (q[:, :, -1:].clone(), _randn(g, device, case.batch, case.heads, 1, case.head_dim),
             _randn(g, device, case.batch, case.heads, 1, case.head_dim))
    return q, k, v, *token


def mac_state(case: Case, device: str, threshold: float) -> tuple[MACState, tuple[torch.Tensor, ...]]:
    """The MAC state after the case's prompt, and the decode token ``(q, k, v)`` its steps repeat."""
    q, k, v, *token = _decode_inputs(case, device)
    with torch.no_grad():
        return mac_prefill(q, k, v, threshold=threshold)[1], tuple(token)


def _mac_call(case: Case, device: str, threshold: float) -> Call:
    """:data:`MAC_STEPS` ``mac_step`` calls per timed call, continuing one sequence."""
    state, token = mac_state(case, device, threshold)

    def steps() -> None:
        with torch.no_grad():
            for _ in range(MAC_STEPS):
                mac_step(state, *token)

    return steps


def mac_hit_call(case: Case, device: str) -> Call:
    """MAC decoding whose queries repeat the last prompt query: every lookup matches (threshold 0.95)."""
    return _mac_call(case, device, 0.95)


def mac_miss_call(case: Case, device: str) -> Call:
    """MAC decoding with a threshold above 1: no lookup matches, every step takes the exact path."""
    return _mac_call(case, device, 1.5)


def softmax_decode_call(case: Case, device: str) -> Call:
    """:data:`MAC_STEPS` ``attnzoo.step`` softmax decoding calls per timed call, continuing one sequence."""
    q, k, v, *token = _decode_inputs(case, device)
    with torch.no_grad():
        state = [az.prefill(q, k, v, method="softmax")[1]]

    def steps() -> None:
        with torch.no_grad():
            for _ in range(MAC_STEPS):
                state[0] = az.step(state[0], *token)[1]

    return steps


FULL_CACHE = Target("SDPA over each sequence's full cache", workload=full_cache_sdpa_call)
HYDRAGEN = Target("Hydragen (shared path)", workload=shared_prefix_call)
SOFTMAX_DECODE = Target(f"az.step softmax ×{MAC_STEPS}", workload=softmax_decode_call)


def _hydragen(batch: int, prefix: int, floors: dict) -> Case:
    auto = auto_path(batch, prefix)
    return Case(f"hydragen_{batch}x{prefix}",
                f"Hydragen, {batch} sequences sharing a prefix of {prefix} (suffix {SUFFIX}, one decode query each) "
                f"vs SDPA over each sequence's full cache; auto takes the {auto} path here", "compare", HYDRAGEN,
                against=FULL_CACHE, batch=batch, n=prefix, floors=floors, rounds=5, threads=1)


CASES = (
    _hydragen(64, 8192, {"speedup": at_least(10)}),
    _hydragen(8, 1024, {}),
    _hydragen(64, 256, {}),
    Case("hydragen_tree", f"two-level tree (prefix 4096 shared by 64, {GROUPS} sub-prefixes of {SUB_PREFIX} each "
         f"shared by 8, suffix {SUFFIX}) vs one level (sub-prefix held per sequence)", "compare",
         Target("two-level tree", workload=tree_call), against=Target("one level", workload=one_level_call),
         batch=64, n=4096, floors={"speedup": at_least(1.5)}, rounds=5, threads=1),
    Case("merge_halves_4k", "attention over each half of 4096 keys merged by az.merge vs SDPA over all of them",
         "compare", Target("two halves + az.merge", workload=halves_merged_call), n=4096, metric="time_ratio",
         floors={"time_ratio": at_most(1.1)}, rounds=3, threads=1),
    Case("mac_decode_hit", f"MAC-Attention, {MAC_STEPS} decode steps after a prompt of 16384 whose queries repeat "
         "the last prompt query (hit rate 1) vs az.step softmax", "compare",
         Target(f"mac_step ×{MAC_STEPS} (hits)", workload=mac_hit_call), against=SOFTMAX_DECODE, n=16384,
         rounds=3, threads=1),
    Case("mac_decode_miss", f"MAC-Attention, {MAC_STEPS} decode steps after a prompt of 16384 at threshold 1.5 (hit "
         "rate 0: the exact path) vs az.step softmax", "compare",
         Target(f"mac_step ×{MAC_STEPS} (misses)", workload=mac_miss_call), against=SOFTMAX_DECODE, n=16384,
         rounds=3, threads=1),
)
