"""The registry-driven conformance suite: every method × supported pattern × backend, bad inputs and decoding per
method. The cases are read from the registry at collection time, so a backend registered before collection (by a
package outside attnzoo, through ``attnzoo.register_backend``) is checked too."""

from __future__ import annotations

import pytest
import torch

import attnzoo  # noqa: F401  (registers every method)
from attnzoo import verify
from attnzoo.registry import all_methods, decoding_methods, get

CASES = verify.cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case: verify.Case) -> None:
    backend = get(case.method).backend(case.backend)
    if backend.devices is not None and "cpu" not in backend.devices:
        pytest.skip(f"{case.backend} runs on {'/'.join(backend.devices)} only (attnzoo verify --device cuda)")
    results = verify.run_case(case)
    failures = [f"{r.check}: {r.detail}" for r in results if r.status == "fail"]
    assert not failures, "\n".join(failures)
    ran = [r.check for r in results if r.status == "pass"]
    if backend.dtypes is None or torch.float32 in backend.dtypes:
        assert "fp32" in ran, f"the fp32 output check did not run: {results}"


@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_bad_inputs(name: str) -> None:
    failures = [f"{r.case}: {r.detail}" for r in verify.bad_input_checks(name) if r.status == "fail"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", decoding_methods())
def test_prefill_then_step_equals_one_causal_forward(name: str) -> None:
    result = verify.decoding_check(name)
    assert result.status == "pass", result.detail


def test_every_method_has_a_fast_path() -> None:
    for m in all_methods():
        assert m.backends, f"{m.name} has only its reference"
        assert all(b.fn is not m.reference for b in m.backends), f"{m.name}: a fast path is the reference"


DECODING_EXCEPTIONS: dict[str, str] = {
    "block_sparse": "its selection is given for one (seq_q, seq_kv); a decoded token needs a new selection, which the "
                    "D-family methods that select (moba, ...) make per step",
}
"""Exact methods with a self/causal pattern that deliberately do not decode, with the reason."""


def test_every_exact_causal_method_decodes() -> None:
    """Every exact method with a self/causal pattern decodes (``attnzoo.prefill``/``attnzoo.step``), and only methods
    with a causal pattern declare decoding."""
    for m in all_methods():
        causal = "self/causal" in m.spec.patterns
        if causal and m.spec.exact and m.name not in DECODING_EXCEPTIONS:
            assert m.spec.decoding and m.decoder is not None, f"{m.name} is exact and causal but does not decode"
        if not causal:
            assert not m.spec.decoding, f"{m.name} declares decoding without a causal pattern"
