"""The registry-driven conformance suite: every method × supported pattern × backend, and bad inputs per method."""

from __future__ import annotations

import pytest

import attnzoo  # noqa: F401  (registers every method)
from attnzoo import verify
from attnzoo.registry import all_methods

CASES = verify.cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case: verify.Case) -> None:
    results = verify.run_case(case)
    failures = [f"{r.check}: {r.detail}" for r in results if r.status == "fail"]
    assert not failures, "\n".join(failures)
    ran = [r.check for r in results if r.status == "pass"]
    assert "fp32" in ran, f"the fp32 output check did not run: {results}"


@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_bad_inputs(name: str) -> None:
    failures = [f"{r.case}: {r.detail}" for r in verify.bad_input_checks(name) if r.status == "fail"]
    assert not failures, "\n".join(failures)


def test_every_method_has_a_fast_path() -> None:
    for m in all_methods():
        assert m.backends, f"{m.name} has only its reference"
        assert all(b.fn is not m.reference for b in m.backends), f"{m.name}: a fast path is the reference"
