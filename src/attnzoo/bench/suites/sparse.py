"""Suite ``sparse`` (D family, issue 12): the block-sparse attend kernel against SDPA at N = 16384 (B=1 H=8 D=64,
fp32, forward, noncausal), on a random selection of 128×128 blocks per (head, query block) built once per case (the
selection is given, so its cost is not in the figure; a D-family method that selects per call pays it in its own
case). Ideal speed-ups: 1 / density (16× at 1/16, 4× at 1/4).

One torch thread for the block_sparse cases, as the radial suite: on a machine shared with other jobs each of the
sparse path's many small multi-threaded ops can wait a scheduler slice for its second thread (measured: 2 threads under
a load of 3.6 on 2 cores made the 1/4 case 10× slower while SDPA, one large op, only doubled).

D1 ``moba`` (causal, blocks of 256, top_k 4, selection included in every call) against causal SDPA, forward and
forward+backward, with the default threads (its kernel makes ≈ 30 fused calls, batched by size): each query sees
about ``3·256 + 128`` keys against SDPA's ``N/2`` on average, ideal ≈ 9×.

D2 ``biformer`` (noncausal, a 128×128 layout cut into 8×8-token regions, top_k 4, routing and the two permutations to
and from region-major order included in every call) against SDPA: each query sees ``4·64`` of the ``16384`` keys
(density 1/64, ideal 64×); one torch thread, as the block_sparse cases (its kernel makes ≈ 40 fused calls).

Every D method side by side at equal density (cases ``d_<method>``, no floors): forward at N=16384 with the parameters
its ``spec.at_density`` gives for reading 1/8 of the keys a query may see (:func:`at_eighth`), selection included in
every call, in the setting of its paper (causal for the language-model methods, noncausal for the vision and video
ones), one torch thread. AdaSpa's figure includes its search, whose cost its users amortise by reusing the selection
(the block_sparse cases time attending over a stored selection)."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.bench.measure import make_call
from attnzoo.bench.suites import Case, Target, at_least
from attnzoo.kernels.selection import random_selection
from attnzoo.registry import get

BLOCK = 128


def _selection(n: int, heads: int, generator: torch.Generator, density: float) -> dict[str, Any]:
    return {"selection": random_selection(1, heads, density=density, block_q=BLOCK, block_k=BLOCK, seq_q=n, seq_kv=n,
                                          generator=generator)}


def selection_1_16(n: int, heads: int, generator: torch.Generator) -> dict[str, Any]:
    """A random selection of 1/16 of the 128-token key blocks per (head, query block)."""
    return _selection(n, heads, generator, 1 / 16)


def selection_1_4(n: int, heads: int, generator: torch.Generator) -> dict[str, Any]:
    """A random selection of 1/4 of the 128-token key blocks per (head, query block)."""
    return _selection(n, heads, generator, 1 / 4)


def at_eighth(method: str, causal: bool, n: int = 16384) -> dict[str, Any]:
    """``method``'s parameters for reading 1/8 of the keys a query may see at length ``n`` (B=1, H=8, D=64)."""
    shape = {"batch": 1, "heads": 8, "kv_heads": 8, "seq_q": n, "seq_kv": n, "head_dim": 64, "device": "cpu",
             "dtype": "float32"}
    at_density = get(method).spec.at_density
    assert at_density is not None, method
    return at_density(make_call(shape, causal, False), 1 / 8)


def equal_density_case(name: str, causal: bool) -> Case:
    """The case ``d_<name>``: ``name`` at :func:`at_eighth`'s parameters (shown in its description), one thread."""
    params = at_eighth(name, causal)
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    return Case(f"d_{name}", f"{name} at density 1/8 ({shown}; {'causal' if causal else 'noncausal'}, selection "
                f"included), N=16384 vs {'causal ' if causal else ''}SDPA", "compare",
                Target(f"{name} (auto)", name, params=params), causal=causal, threads=1)


# the D methods and whether their paper's setting is causal (language models) or not (vision, video)
EQUAL_DENSITY = (("moba", True), ("biformer", False), ("pbs", True), ("landmark", True), ("routing", True),
                 ("seer", True), ("hip", True), ("hyper", True), ("dhsa", True), ("rectified_sparse", False),
                 ("adaspa", False), ("token_topk", False))

CASES = (
    Case("block_sparse_d16", "block_sparse, random selection at 1/16 block density (blocks 128), N=16384 vs SDPA",
         "compare", Target("block_sparse (torch)", "block_sparse", "torch", tensors=selection_1_16),
         floors={"speedup": at_least(8)}, threads=1),
    Case("block_sparse_d4", "block_sparse, random selection at 1/4 block density (blocks 128), N=16384 vs SDPA",
         "compare", Target("block_sparse (torch)", "block_sparse", "torch", tensors=selection_1_4),
         floors={"speedup": at_least(3)}, threads=1),
    Case("moba_causal", "moba causal, blocks 256, top_k 4 (selection included), N=16384 vs causal SDPA", "compare",
         Target("moba (torch)", "moba", "torch", params={"block_size": 256, "top_k": 4}), causal=True,
         floors={"speedup": at_least(4)}),
    Case("moba_causal_train", "moba causal, blocks 256, top_k 4, forward+backward, N=16384 vs causal SDPA",
         "compare", Target("moba (torch)", "moba", "torch", params={"block_size": 256, "top_k": 4}), causal=True,
         backward=True, floors={"speedup": at_least(3)}),
    Case("biformer_128", "biformer, 128×128 layout, 8×8 regions, top_k 4 (routing included), N=16384 vs SDPA",
         "compare", Target("biformer (torch)", "biformer", "torch",
                           params={"layout": (128, 128), "region": 8, "top_k": 4}),
         floors={"speedup": at_least(10)}, threads=1),
    *(equal_density_case(name, causal) for name, causal in EQUAL_DENSITY),
)
