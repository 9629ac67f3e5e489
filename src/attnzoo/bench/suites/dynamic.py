"""Suite ``dynamic`` (issue 12): the D family side by side at equal density — how far each dynamic-sparse method is
from full softmax attention, and how well a model trained with it recalls.

Approximation grid. For every method of the D family (``spec.family == "sparse"``) that says how to reach a density
(``spec.at_density``; ``topk`` has one too but is S7) and for each of its self-attention patterns, on two kinds of
inputs, at densities 1/4, 1/8 and 1/16 (the fraction of the keys a query may see that the method reads, as its
``at_density`` sets it):

- ``planted`` — a few keys per query carry most of the mass: ``k ~ N(0, 1)``; each query ``i`` gets
  :attr:`DynamicSuite.planted` keys drawn uniformly among those it may see (``j ≤ i`` when causal) and
  ``q_i = s · Σ_j k̂_j / √planted + N(0, 1)`` (``k̂`` unit keys, ``s`` = :attr:`DynamicSuite.strength`): at the
  default ``s = 16`` the planted keys hold ≈ 84 % of each causal row's softmax mass (measured, N = 1024). They are
  scattered, not clustered in blocks: a selection has to find them from content.
- ``random`` — ``q, k ~ N(0, 1.6²)`` (logits with a standard deviation of about 2.5, as :mod:`attnzoo.bench.approx`),
  where no small set of keys dominates: the hard case for any sparse method.

Each method runs with what its ``at_density`` sets and its defaults for the rest (learnable parts at their
defaults: SeerAttention's training-free gate, routing's drawn centroids, no key convolution for MoBA). Per cell:
``rel_l2 = ‖O − O_softmax‖ / ‖O_softmax‖``, ``mass_recall`` (the mean softmax mass on the keys the method
reads) and the measured ``density`` (the fraction of visible query-key pairs read), both from the effective weights
(the method run with ``V = I``, :func:`attnzoo.bench.approx.weights_metrics`). ``v ~ N(0, 1)``; B = 1, fp32. The
``oracle`` row is the ceiling for block selections: ``block_sparse`` over the key blocks (``seq / 32`` keys each) of
highest true softmax mass per query block, as many as ``moba``'s ``at_density`` reads.

Associative recall. Each causal method and ``softmax`` train the same tiny model (:class:`attnzoo.bench.quality.
TinyLM`) on multi-query associative recall (:func:`attnzoo.bench.quality.mqar`) at an equal budget (same seed, steps,
batch, learning rate), the sparse methods at density :attr:`DynamicSuite.recall_density`, with their learnable parts
as :class:`attnzoo.nn.Attention` creates them (MoBA's key convolution, the identity at the start, is trained;
SeerAttention's gate and routing's centroids get no gradient through their selections and keep their initial
values); the figure is the accuracy on a held-out batch. Methods without a causal self-attention pattern or without
gradients are listed as skipped, and so is ``landmark`` (:data:`NOT_RECALLED`: its sequences must carry landmark
tokens, which the task's do not; in the approximation grid every ``(block_size + 1)``-th token simply plays the
landmark).

The tables are in ``summary.md``, ``report.html`` and ``dynamic.md`` (ready for docs/benchmarks.md); the rows in
``results.json`` under ``dynamic`` (schema ``attnzoo.bench/1.4``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnzoo.api import attention, prepare
from attnzoo.bench import quality
from attnzoo.bench.approx import QK_STD, weights_metrics
from attnzoo.bench.efficiency import classify, pick_backend
from attnzoo.bench.measure import make_call
from attnzoo.bench.suites import DYNAMIC, by_name, cpu_run
from attnzoo.errors import fail
from attnzoo.kernels.selection import topk_blocks
from attnzoo.registry import Method, all_methods, get

INPUTS = ("planted", "random")
PATTERNS = ("self/causal", "self/noncausal")
ORACLE = "oracle"
ORACLE_BLOCKS = 32  # the oracle's key blocks per sequence (moba's at_density uses the same)
# methods left out of the recall task, with the reason
NOT_RECALLED = {"landmark": "its sequences must hold a landmark token closing each block (the paper's data pipeline "
                            "inserts them); the task's sequences have none"}


@dataclass(frozen=True)
class DynamicSuite:
    """Sizes of the approximation grid (``seq`` tokens, ``heads`` heads of ``head_dim``; ``planted`` keys per query
    at ``strength``) and of the associative-recall training (``pairs`` key-value pairs of a ``vocab``-token
    vocabulary; a ``layers``-layer model of width ``dim`` with ``model_heads`` heads, ``steps`` AdamW steps of
    ``batch`` sequences at ``lr``; sparse methods at ``recall_density``)."""

    seq: int = 1024
    heads: int = 4
    head_dim: int = 64
    densities: tuple[float, ...] = (1 / 4, 1 / 8, 1 / 16)
    planted: int = 4
    strength: float = 16.0
    pairs: int = 16
    vocab: int = 64
    dim: int = 64
    model_heads: int = 2
    layers: int = 2
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    recall_density: float = 1 / 4
    seed: int = 0


FULL = DynamicSuite()


def methods(patterns: list[str] | None = None) -> list[Method]:
    """The D family's methods with ``spec.at_density`` (registry order), or those whose names match ``patterns``
    (``fnmatch``; ``softmax`` and ``oracle`` are always measured as the baselines)."""
    chosen = [m for m in all_methods() if m.spec.family == "sparse" and m.spec.at_density is not None]
    return by_name(chosen, patterns, "methods with a density setting") if patterns else chosen


def inputs(kind: str, causal: bool, cfg: DynamicSuite) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v (1, heads, seq, head_dim)`` of the ``planted`` or ``random`` kind (module docstring)."""
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (1, cfg.heads, cfg.seq, cfg.head_dim)
    if kind == "random":
        q, k = torch.randn(shape, generator=g) * QK_STD, torch.randn(shape, generator=g) * QK_STD
    elif kind == "planted":
        k = torch.randn(shape, generator=g)
        reach = torch.arange(1, cfg.seq + 1) if causal else torch.full((cfg.seq,), cfg.seq)
        picked = (torch.rand(1, cfg.heads, cfg.seq, cfg.planted, generator=g) * reach.view(-1, 1)).long()
        unit = k / k.norm(dim=-1, keepdim=True)
        chosen = unit.gather(2, picked.flatten(2).unsqueeze(-1).expand(-1, -1, -1, cfg.head_dim))
        direction = chosen.view(*shape[:3], cfg.planted, cfg.head_dim).sum(3) / math.sqrt(cfg.planted)
        q = cfg.strength * direction + torch.randn(shape, generator=g)
    else:
        raise fail("kind", f"one of {list(INPUTS)}", repr(kind))
    return q, k, torch.randn(shape, generator=g)


def oracle_params(q: torch.Tensor, k: torch.Tensor, causal: bool, fraction: float) -> dict[str, Any]:
    """``block_sparse``'s selection of the key blocks of highest true softmax mass per query block (blocks of
    ``seq / 32``; ``round(fraction · 32)`` of them per query block)."""
    sq, skv = q.shape[2], k.shape[2]
    block = max(1, skv // ORACLE_BLOCKS)
    nq, nk = -(-sq // block), -(-skv // block)
    p = attention(q, k, torch.eye(skv).expand(k.shape[0], k.shape[1], skv, skv), method="softmax", causal=causal,
                  backend="reference")
    p = torch.nn.functional.pad(p, (0, nk * block - skv, 0, nq * block - sq))
    mass = p.view(*p.shape[:2], nq, block, nk, block).sum(dim=(3, 5))
    top_k = max(1, round(fraction * nk))
    return {"selection": topk_blocks(mass, top_k, causal=causal, seq_q=sq, seq_kv=skv, block_q=block, block_k=block)}


def _row(method: str, **fields: Any) -> dict[str, Any]:
    spec = get("block_sparse" if method == ORACLE else method).spec
    return {"method": method, "mechanism": "—" if method == ORACLE else spec.mechanism, **fields}


def approximation(m: Method | None, pattern: str, kind: str, fraction: float, cfg: DynamicSuite) -> dict[str, Any]:
    """One cell of the grid (``m`` None: the oracle)."""
    causal = pattern.endswith("/causal")
    q, k, v = inputs(kind, causal, cfg)
    method = get("block_sparse") if m is None else m
    if m is None:
        params = oracle_params(q, k, causal, fraction)
    else:  # the density setting and the defaults, nothing sampled (no random learnable parts)
        shape = {"batch": 1, "heads": cfg.heads, "kv_heads": cfg.heads, "seq_q": cfg.seq, "seq_kv": cfg.seq,
                 "head_dim": cfg.head_dim, "device": "cpu", "dtype": "float32"}
        params = m.spec.at_density(make_call(shape, causal, False), fraction)
    call = prepare(method, q, k, v, causal, None, None, None, params)[0]
    backend = pick_backend(method, call, ())
    with torch.no_grad():
        out = attention(q, k, v, method=method.name, causal=causal, backend=backend, **params)
        ref = attention(q, k, v, method="softmax", causal=causal, backend="reference")
        row = {"rel_l2": float((out - ref).norm() / ref.norm().clamp_min(1e-30)), "backend": backend}
        row.update(weights_metrics(method, backend, q, k, causal, params, cfg.seed, complete=True))
    return row


def recall(method: str, cfg: DynamicSuite) -> dict[str, Any]:
    """Associative-recall accuracy of the tiny model trained with ``method`` (at ``recall_density`` when it has a
    density setting)."""
    m = get(method)
    if method in NOT_RECALLED:
        return {"status": "skipped", "reason": NOT_RECALLED[method]}
    if "self/causal" not in m.spec.patterns:
        return {"status": "skipped", "reason": "no causal self-attention pattern"}
    if not m.spec.differentiable:
        return {"status": "skipped", "reason": "inference-only method"}
    seq = 3 * cfg.pairs
    case = {"kind": "quality", "method": method, "task": {"name": "mqar", "pairs": cfg.pairs, "vocab": cfg.vocab},
            "seed": cfg.seed, "device": "cpu", "dim": cfg.dim, "heads": cfg.model_heads, "layers": cfg.layers,
            "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr}
    if m.spec.at_density is not None:
        _, call = quality.fixed_params(m, seq, case)
        case["params"] = m.spec.at_density(call, cfg.recall_density)
    return quality.run_case(case)


def run(
    out: Path, patterns: list[str] | None = None, cfg: DynamicSuite = FULL, command: str = "",
    threads: int | None = None, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The grid and the recall runs for the methods chosen by ``patterns`` (all without); writes results.json, the
    report and dynamic.md under ``out``. Torch runs on ``threads`` intra-op threads (default 1)."""
    from attnzoo.bench.tables import dynamic_markdown

    chosen = methods(patterns)
    config = {"suite": DYNAMIC, **asdict(cfg), "dtype": "float32"}
    with cpu_run(out, command, config, threads, ("dynamic.md", dynamic_markdown)) as results:
        rows = results["dynamic"]
        grid: list[tuple[Method | None, str]] = [(None, p) for p in PATTERNS]
        grid += [(m, p) for m in chosen for p in PATTERNS if p in m.spec.patterns]
        for m, pattern in grid:
            for kind in INPUTS:
                for fraction in cfg.densities:
                    row = _row(ORACLE if m is None else m.name, kind="approximation", pattern=pattern, inputs=kind,
                               target_density=fraction)
                    started = time.perf_counter()
                    try:
                        row.update(approximation(m, pattern, kind, fraction, cfg), status="ok", reason="")
                    except Exception as e:  # a failing method is recorded; the suite goes on
                        row["status"], row["reason"] = classify(e)
                    row["wall_s"] = time.perf_counter() - started
                    rows.append(row)
                    echo(f"{row['method']} {pattern} {kind} 1/{round(1 / fraction)}: "
                         + (f"rel-L2 {row['rel_l2']:.3f}, mass recall {row['mass_recall'] or math.nan:.3f}"
                            if row["status"] == "ok" else f"{row['status']}: {row['reason']}"))
        for name in ["softmax", *(m.name for m in chosen)]:
            started = time.perf_counter()
            row = _row(name, kind="recall", pattern="self/causal", task=f"mqar ({cfg.pairs} pairs)",
                       target_density=None if name == "softmax" else cfg.recall_density)
            result = recall(name, cfg)
            row.update({k: v for k, v in result.items() if k in ("status", "reason", "accuracy", "chance",
                                                                 "final_loss", "train_time_s", "params")})
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
            echo(f"{name} mqar: " + (f"accuracy {row['accuracy']:.3f}" if row["status"] == "ok"
                                     else f"{row['status']}: {row['reason']}"))
    return results
