"""How far each method's output is from softmax attention on the same inputs.

For an approximate method (``spec.exact`` False: sparse, low-rank, quantised...) this is its approximation error. For
an exact method that computes a different function (sigmoid, linear attention, a local window) it is the size of that
difference, not an error; both are reported so the two kinds can be compared on one scale (``exact`` column).

Inputs: ``q, k ~ N(0, 1.6²)`` so that logits ``q·k/√D`` have a standard deviation of about 2.5 (attention as peaked
as in trained models rather than near-uniform, where every approximation looks good), ``v ~ N(0, 1)``, fp32.

Metrics per case:
- ``rel_l2``: ``‖O_method − O_softmax‖ / ‖O_softmax‖`` over the whole output;
- the method's *effective attention weights* ``A``: every attention method is linear in V, so running it with
  ``V = I`` (one-hot values, ``Dv = seq_kv``) returns ``A`` itself, with no per-method code. From ``A`` and the softmax
  weights ``P``: ``mass_recall`` is the mean over queries of the softmax mass on the keys the method gives a non-zero
  weight (``A ≠ 0``: the keys it reads at all), and ``density`` the fraction of visible query-key pairs it reads.
  A method that cannot take ``Dv ≠ D`` leaves these empty and says why.

Settings (density, rank, bits...) are swept generically: each plain parameter with choices takes every choice, each
numeric one ½× and 2× its default within its bounds, one parameter at a time, others at their defaults.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.api import attention
from attnzoo.bench import measure
from attnzoo.bench.efficiency import BASELINE, classify, guarded, pick_backend, resolve, shape
from attnzoo.methods.common import visible
from attnzoo.registry import Method, get

QK_STD = 1.6
MAX_SETTINGS = 8


def settings(m: Method) -> list[dict[str, Any]]:
    """The parameter overrides to sweep: ``{}`` (defaults) first, then one parameter changed at a time."""
    out: list[dict[str, Any]] = [{}]
    for p in m.spec.params:
        if p.init is not None or torch.Tensor in p.types or p.default is None or isinstance(p.default, bool):
            continue
        if p.choices is not None:
            values = [c for c in p.choices if c != p.default]
        elif isinstance(p.default, (int, float)):
            values = []
            for factor in (0.5, 2.0):
                x = p.default * factor
                if isinstance(p.default, int):
                    x = round(x)
                if p.low is not None and (x < p.low or (p.low_open and x <= p.low)):
                    continue
                if p.high is not None and x > p.high:
                    x = p.high
                if x != p.default and x not in values:
                    values.append(x)
        else:
            continue
        out.extend({p.name: v} for v in values)
    return out[:MAX_SETTINGS]


def plan(methods: list[Method], patterns: list[str], length: int, dims: dict[str, Any], seed: int,
         sweep_pattern: str | None, avoid: list[str]) -> list[dict[str, Any]]:
    """Every method but the baseline: defaults on the sweep pattern (``sweep_pattern``, or the first supported), then
    defaults on its other patterns, then the settings sweep on the sweep pattern, so that a run cut short by its time
    budget has the defaults of every method first. Backends named in ``avoid`` are not used."""
    first, others, sweeps = [], [], []
    for m in methods:
        if m.name == BASELINE[0]:
            continue
        supported = [p for p in patterns if p in m.spec.patterns]
        if not supported:
            continue
        sweep_at = sweep_pattern if sweep_pattern in supported else supported[0]
        for pattern in supported:
            for i, setting in enumerate(settings(m) if pattern == sweep_at else [{}]):
                case = {"kind": "approx", "method": m.name, "pattern": pattern, "setting": setting, "seed": seed,
                        "avoid": list(avoid)}
                case.update(shape(pattern, length, **{**dims, "dtype": "float32"}))
                (sweeps if i else first if pattern == sweep_at else others).append(case)
    return first + others + sweeps


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    return guarded(case, _measure)


def _measure(case: dict[str, Any]) -> dict[str, Any]:
    m = get(case["method"])
    causal = case["pattern"].endswith("/causal")
    seed = int(case.get("seed", 0))
    q, k, v = measure.make_qkv(case, seed, qk_std=QK_STD)
    params, call = resolve(m, "auto", q, k, v, causal, seed)
    params = {**params, **case.get("setting", {})}
    backend = pick_backend(m, call, case.get("avoid", ()))
    with torch.no_grad():
        out = attention(q, k, v, method=m.name, causal=causal, backend=backend, **params)
        ref = attention(q, k, v, method="softmax", causal=causal, backend="reference")
        result: dict[str, Any] = {
            "rel_l2": float((out - ref).norm() / ref.norm().clamp_min(1e-30)),
            "exact": m.spec.exact,
            "backend": backend,
            "params": measure.describe_params(params),
        }
        result.update(weights_metrics(m, backend, q, k, causal, params, seed))
    return result


def weights_metrics(
    m: Method, backend: str, q: torch.Tensor, k: torch.Tensor, causal: bool, params: dict[str, Any], seed: int,
    complete: bool = False,
) -> dict[str, Any]:
    """``mass_recall``, ``density`` (module docstring) and ``probe`` (why they are missing, else empty) of ``m``
    with ``params`` on ``q, k``: the method run with ``V = I`` gives its effective weights. Learnable tensors are
    sampled again for the probe's value width from ``seed`` (as the output's were), unless ``complete``: then the
    probe runs with exactly ``params``."""
    skv = k.shape[2]
    eye = torch.eye(skv, dtype=q.dtype, device=q.device).expand(k.shape[0], k.shape[1], skv, skv)
    try:
        if complete:
            probe_params = params
        else:
            probe_params, _ = resolve(m, backend, q, k, eye, causal, seed)
            probe_params = {**probe_params, **{n: v for n, v in params.items() if not isinstance(v, torch.Tensor)}}
        a = attention(q, k, eye, method=m.name, causal=causal, backend=backend, **probe_params)
    except Exception as e:  # the probe is optional
        return {"mass_recall": None, "density": None, "probe": classify(e)[1]}
    p = attention(q, k, eye, method="softmax", causal=causal, backend="reference")
    seen = visible(causal, None, q, k)
    support = a != 0
    rows = seen.any(dim=-1)
    recall = float((p * support).sum(dim=-1)[rows].mean())
    density = float((support & seen).sum() / seen.sum().clamp_min(1))
    return {"mass_recall": recall if math.isfinite(recall) else None, "density": density, "probe": ""}
