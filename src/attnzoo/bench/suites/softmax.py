"""Suite ``softmax`` (issue 2: S3, S4, S7, S8, S9; issue 15: S5): every backend of the softmax-form variants, the
dense reference included, against SDPA at B=1 H=8 N=2048 D=64, non-causal and causal, without floors: the figures of
the "Softmax-form variants" table. Energy-gated attention (S5) claims no measurable cost over attention, so its fast
path also has cases at N=4096, forward (floor: at least 0.8× SDPA's speed) and forward+backward
(:data:`ENERGY_GATED_CASES`)."""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_least
from attnzoo.registry import get

HEADS, HEAD_DIM, N = 8, 64, 2048


def selective_temperatures(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Selective attention's learnable temperatures, small and random (zero position bias)."""
    return {"query_temp": 0.1 * torch.randn(heads, HEAD_DIM, generator=g), "pos_beta": torch.zeros(heads),
            "value_temp": 0.1 * torch.randn(heads, HEAD_DIM, generator=g)}


def urpe_coefficients(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """URPE's relative-position coefficients near 1, one per head and offset."""
    return {"urpe_coeffs": 1 + 0.1 * torch.randn(heads, 2 * n - 1, generator=g)}


def energy_gates(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Energy-gated attention's learnable gate at the layer's initialisation, with the paper's learned threshold."""
    return {"energy_proj": 0.02 * torch.randn(heads, HEAD_DIM, generator=g), "threshold": torch.full((heads,), 0.35),
            "sharpness": torch.full((heads,), 2.0)}


SETTINGS: dict[str, tuple[dict, object]] = {
    "momentum": ({"gamma": 0.5}, None),
    "selective": ({}, selective_temperatures),
    "topk": ({"top_k": 64}, None),
    "urpe": ({}, urpe_coefficients),
    "score_mod": ({"alibi": True, "softcap": 30.0}, None),
    "energy_gated": ({}, energy_gates),
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


ENERGY_GATED = Target("energy_gated (sdpa)", "energy_gated", "sdpa", tensors=energy_gates)
ENERGY_GATED_CASES = tuple(
    Case(f"energy_gated_n4096_{tag}{'_grad' if backward else ''}",
         f"energy_gated (sdpa) vs SDPA, {tag}, {'forward+backward' if backward else 'forward'}, B=1 H=8 N=4096 D=64",
         "compare", ENERGY_GATED, n=4096, causal=causal, backward=backward, metric="speedup",
         floors={} if backward else {"speedup": at_least(0.8)}, rounds=5 if backward else 7, threads=1)
    for backward in (False, True) for causal, tag in ((False, "noncausal"), (True, "causal"))
)

CASES = _cases() + ENERGY_GATED_CASES
