"""The registry's contract seen from outside: a backend registered by another package (one call, no edit to attnzoo)
is dispatched by its declarations and priority and checked by the conformance suite; decoders are checked too."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo import registry, verify
from attnzoo.api import prepare, select_backend
from attnzoo.cli import main
from attnzoo.errors import AttnzooError


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Every registration a test makes is undone after it."""
    saved = dict(registry._REGISTRY)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def _softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    return az.get("softmax").reference(q, k, v, **kw)


def _rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """An "approximate kernel": the reference with its output rounded through bfloat16 (errors up to ~1e-2)."""
    return _softmax_reference(q, k, v, **kw).to(torch.bfloat16).to(q.dtype)


def _qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 9, 8, generator=g, dtype=dtype) for _ in range(3))


def test_external_backend_is_dispatched_by_priority_and_declarations(restore_registry: None) -> None:
    az.register_backend("softmax", az.Backend("mykernel", _softmax_reference, dtypes=(torch.float32,),
                                              differentiable=False, priority={"cpu": 100}))
    m = az.get("softmax")
    assert m.spec.backends[-1] == "reference" and "mykernel" in m.spec.backends
    q, k, v = _qkv()
    assert select_backend(m, prepare(m, q, k, v, False, None, None, None, {})[0], "auto").name == "mykernel"
    q64, k64, v64 = _qkv(torch.float64)  # a dtype it does not declare: auto skips it, naming it says why
    assert select_backend(m, prepare(m, q64, k64, v64, False, None, None, None, {})[0], "auto").name == "sdpa"
    with pytest.raises(AttnzooError, match=r"^backend:.*mykernel.*float32"):
        az.attention(q64, k64, v64, backend="mykernel")
    q.requires_grad_(True)  # no backward: auto falls to the next one
    assert select_backend(m, prepare(m, q, k, v, False, None, None, None, {})[0], "auto").name == "sdpa"


def test_default_priority_keeps_builtins_first(restore_registry: None) -> None:
    az.register_backend("score_mod", az.Backend("mykernel", _softmax_reference))
    m = az.get("score_mod")
    assert [b.name for b in m.by_priority("cpu")] == ["torch", "flex", "mykernel"]
    assert [b.name for b in m.by_priority("cuda")] == ["flex", "torch", "mykernel"]


def test_conformance_checks_an_external_approximate_backend(restore_registry: None) -> None:
    """Approximate within its tolerance passes; the same kernel declared exact (or too tight) fails."""
    az.register_backend("softmax", az.Backend("rounded", _rounded, exact=False, tolerance=az.Tolerance(2e-2, 2e-2)))
    cases = [c for c in verify.cases(["softmax"]) if c.backend == "rounded"]
    assert len(cases) == 4  # one per pattern softmax supports
    results = verify.run_case(cases[0])
    assert [r.check for r in results if r.status == "fail"] == [], results
    assert {"fp64", "fp32", "grad"} <= {r.check for r in results if r.status == "pass"}

    az.register_backend("softmax", az.Backend("rounded_exact", _rounded))
    failed = {r.check for r in verify.run_case(verify.Case("softmax", "rounded_exact", "self/noncausal"))
              if r.status == "fail"}
    assert {"fp64", "fp32"} <= failed


@pytest.mark.parametrize(
    ("backend", "argument"),
    [
        (az.Backend("reference", _softmax_reference), "backend"),
        (az.Backend("auto", _softmax_reference), "backend"),
        (az.Backend("sdpa", _softmax_reference), "backend"),  # softmax has one already
        (az.Backend("my kernel", _softmax_reference), "backend"),
        (az.Backend("approx", _softmax_reference, exact=False), "tolerance"),
    ],
)
def test_bad_backend_registrations_name_the_field(restore_registry: None, backend: az.Backend, argument: str) -> None:
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        az.register_backend("softmax", backend)


def test_register_backend_for_unknown_method_suggests_names() -> None:
    with pytest.raises(AttnzooError, match="did you mean 'softmax'"):
        az.register_backend("softmx", az.Backend("mykernel", _softmax_reference))


def _spec(name: str, family: str, mechanism: str) -> az.MethodSpec:
    return az.MethodSpec(name=name, family=family, mechanism=mechanism, paper="none", arxiv=None, summary="test",
                         exact=True, patterns=frozenset({"self/causal"}))


@pytest.mark.parametrize(("family", "mechanism", "argument"), [("nope", "S0", "family"), ("linear", "S0", "mechanism")])
def test_register_rejects_unknown_family_or_foreign_id(restore_registry: None, family: str, mechanism: str,
                                                       argument: str) -> None:
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        registry.register(_spec("test_bad", family, mechanism), _softmax_reference, [])


def test_families_follow_the_catalogue() -> None:
    assert "".join(f.letter for f in registry.FAMILIES) == "SPDLHQKC"
    assert registry.family("linear").folder == "methods/linear"
    for m in registry.all_methods():
        assert m.spec.mechanism.startswith(registry.family(m.spec.family).letter)


def _running_mean(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, **_: Any) -> torch.Tensor:
    """A toy causal method: the mean of the values seen so far (repeated over query heads)."""
    n = v.shape[2]
    out = v.cumsum(2) / torch.arange(1, n + 1, dtype=v.dtype)[:, None]
    return out.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def _mean_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
    return _running_mean(q, k, v, causal=True), (v.sum(2, keepdim=True), v.shape[2])


def _mean_step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, off_by: int = 0,
               **_: Any) -> tuple[torch.Tensor, Any]:
    total, count = state
    total, count = total + v, count + 1
    return (total / (count + off_by)).repeat_interleave(q.shape[1] // v.shape[1], dim=1), (total, count)


@pytest.mark.parametrize(("off_by", "status"), [(0, "pass"), (1, "fail")])
def test_decoding_check_catches_a_wrong_step(restore_registry: None, off_by: int, status: str) -> None:
    def step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
        return _mean_step(state, q, k, v, off_by=off_by)

    registry.register(_spec("test_mean", "softmax", "S0"), _running_mean, [az.Backend("torch", _running_mean)],
                      az.Decoder(_mean_prefill, step))
    assert az.get("test_mean").spec.decoding
    assert verify.decoding_check("test_mean").status == status


PLUGIN = '''
import attnzoo as az

def plugged(q, k, v, **kw):
    return az.get("momentum").backend("sdpa").fn(q, k, v, **kw)

az.register_backend("momentum", az.Backend("plugged", plugged, priority={"cpu": 1}))
'''


def test_verify_imports_a_plugin_and_checks_its_backend(restore_registry: None, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "attnzoo_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "attnzoo_test_plugin", raising=False)
    assert main(["verify", "momentum", "--all", "--plugin", "attnzoo_test_plugin"]) == 0
    assert "momentum-plugged" in capsys.readouterr().out
    assert main(["verify", "momentum", "--plugin", "attnzoo_no_such_plugin"]) == 2
    assert "--plugin" in capsys.readouterr().err


def _lse_over_all_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False,
                       **kw: Any) -> Any:
    """A wrong kernel: the right output, but a log-sum-exp over every key (the user mask ignored)."""
    out = _softmax_reference(q, k, v, **kw)
    if not return_lse:
        return out
    _, lse = _softmax_reference(q, k, v, **{**kw, "mask": None}, return_lse=True)
    return out, lse


def test_split_merge_check_catches_a_log_sum_exp_that_ignores_the_mask(restore_registry: None) -> None:
    az.register_backend("softmax", az.Backend("wrong_lse", _lse_over_all_keys, lse=True))
    results = {r.check: r for r in verify.run_case(verify.Case("softmax", "wrong_lse", "self/noncausal"))}
    assert results["lse"].status == "pass"  # without a mask it is right...
    assert results["split-merge"].status == "fail"  # ...but halves split by the mask no longer merge to the whole
    assert "merged halves != whole" in results["split-merge"].detail


def test_return_lse_needs_a_backend_and_a_method_that_declare_it(restore_registry: None) -> None:
    with pytest.raises(AttnzooError, match=r"^lse:"):
        az.register_backend("sigmoid", az.Backend("mykernel", _softmax_reference, lse=True))
    az.register_backend("softmax", az.Backend("mykernel", _softmax_reference, priority={"cpu": 100}))
    q, k, v = _qkv()
    assert az.attention(q, k, v).shape == q.shape  # auto takes mykernel...
    _, lse = az.attention(q, k, v, return_lse=True)  # ...but not for a log-sum-exp, which it does not return
    assert lse.shape == q.shape[:-1]
    with pytest.raises(AttnzooError, match=r"^backend:.*log-sum-exp"):
        az.attention(q, k, v, backend="mykernel", return_lse=True)
