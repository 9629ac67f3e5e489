"""Suite ``softmax`` (issue 2: S3, S4, S7, S8, S9): every backend of the softmax-form variants, the dense reference
included, against SDPA at B=1 H=8 N=2048 D=64, non-causal and causal. No floors: these are the figures of the
"Softmax-form variants" table."""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target
from attnzoo.registry import get

HEADS, HEAD_DIM, N = 8, 64, 2048


def selective_temperatures(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Selective attention's learnable temperatures, small and random (zero position bias)."""
    return {"query_temp": 0.1 * torch.randn(heads, HEAD_DIM, generator=g), "pos_beta": torch.zeros(heads),
            "value_temp": 0.1 * torch.randn(heads, HEAD_DIM, generator=g)}


def urpe_coefficients(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """URPE's relative-position coefficients near 1, one per head and offset."""
    return {"urpe_coeffs": 1 + 0.1 * torch.randn(heads, 2 * n - 1, generator=g)}


SETTINGS: dict[str, tuple[dict, object]] = {
    "momentum": ({"gamma": 0.5}, None),
    "selective": ({}, selective_temperatures),
    "topk": ({"top_k": 64}, None),
    "urpe": ({}, urpe_coefficients),
    "score_mod": ({"alibi": True, "softcap": 30.0}, None),
}


def _cases() -> tuple[Case, ...]:
    cases = []
    for method, (params, tensors) in SETTINGS.items():
        for backend in get(method).spec.backends:
            for causal in (False, True):
                tag = "causal" if causal else "noncausal"
                cases.append(Case(
                    f"{method}_{backend}_{tag}", f"{method} ({backend}) vs SDPA, {tag}, B=1 H=8 N=2048 D=64",
                    "compare", Target(f"{method} ({backend})", method, backend, params, tensors),  # type: ignore[arg-type]
                    n=N, causal=causal, metric="time_ratio", rounds=3 if backend == "reference" else 5))
    return tuple(cases)


CASES = _cases()
