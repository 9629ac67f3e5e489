"""The D family as a whole: every method but ``block_sparse`` says how to reach a density (``spec.at_density``, what
``attnzoo bench --suite dynamic`` and the equal-density speed cases use), and what it says is a valid call at short
and long lengths in every self pattern it supports."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.api import prepare
from attnzoo.bench.measure import make_call

SPARSE = [az.get(name) for name in az.methods() if az.get(name).spec.family == "sparse"]


def test_every_dynamic_method_has_a_density_setting():
    assert len(SPARSE) >= 13
    assert [m.name for m in SPARSE if m.spec.at_density is None] == ["block_sparse"]


@pytest.mark.parametrize("method", [m for m in SPARSE if m.spec.at_density is not None], ids=lambda m: m.name)
@pytest.mark.parametrize("n", [48, 1024, 16384])
def test_density_settings_are_valid_calls(method, n):
    shape = {"batch": 1, "heads": 8, "kv_heads": 8, "seq_q": n, "seq_kv": n, "head_dim": 64, "device": "cpu",
             "dtype": "float32"}
    q = k = v = torch.empty(1, 8, n, 64)
    for pattern in ("self/causal", "self/noncausal"):
        if pattern not in method.spec.patterns:
            continue
        causal = pattern == "self/causal"
        for fraction in (1 / 4, 1 / 8, 1 / 16):
            params = method.spec.at_density(make_call(shape, causal, False), fraction)
            prepare(method, q, k, v, causal, None, None, None, params)  # raises if a value is out of range
