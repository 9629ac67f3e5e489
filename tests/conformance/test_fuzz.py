"""Shape fuzzing with hypothesis: every non-compiled fast path against its reference on random shapes (an approximate
backend within its declared tolerance)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import verify
from attnzoo.registry import all_methods, get

FAST = [(m.name, b.name) for m in all_methods() for b in m.backends if b.name not in verify.COMPILED_BACKENDS]


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from(FAST),
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    seq_q=st.integers(1, 40),
    seq_kv=st.integers(1, 40),
    head_dim=st.integers(1, 12),
    causal=st.booleans(),
)
def test_fast_paths_match_reference_on_random_shapes(which, batch, kv_heads, group, seq_q, seq_kv, head_dim, causal):
    name, backend = which
    m = get(name)
    pattern = f"{'cross' if seq_q != seq_kv else 'self'}/{'causal' if causal else 'noncausal'}"
    if pattern not in m.spec.patterns:
        return
    shape = verify.Shape(batch, kv_heads * group, kv_heads, seq_q, seq_kv, head_dim, head_dim + 1)
    x = verify.make_inputs(m, shape, causal, torch.device("cpu"))
    with torch.no_grad():
        got = verify._run(m, backend, x, causal)
        want = verify._run(m, "reference", x, causal)
    tol = verify.tolerance(m, backend, verify.FP64)
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
