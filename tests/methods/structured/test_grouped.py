"""Group masks: the predicate by brute force, the segment path against the reference (per-batch ids, cross ids,
groups without keys, user masks), and id validation."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import masks
from attnzoo.errors import AttnzooError
from attnzoo.masks.groups import grouped


def test_grouped_predicate_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    qids, kids = torch.randint(0, 3, (2, 9), generator=g), torch.randint(0, 3, (2, 6), generator=g)
    got = masks.dense(grouped(qids, kids), 2, 1, 9, 6, "cpu")[:, 0]
    want = torch.tensor([[[int(qids[b, i]) == int(kids[b, j]) for j in range(6)] for i in range(9)] for b in range(2)])
    assert torch.equal(got, want)


CASES = [
    (40, 40, False, lambda g: dict(group_ids=torch.randint(0, 4, (40,), generator=g))),
    (40, 40, True, lambda g: dict(group_ids=torch.randint(0, 4, (2, 40), generator=g))),
    (20, 40, True, lambda g: dict(group_ids=torch.randint(0, 4, (20,), generator=g),
                                  kv_group_ids=torch.randint(1, 5, (2, 40), generator=g))),  # group 0 has no key
    (40, 40, True, lambda g: dict()),
]


@pytest.mark.parametrize(("sq", "skv", "causal", "make"), CASES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_grouped_torch_matches_reference(sq, skv, causal, make, with_mask):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, sq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, skv, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, skv, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, sq, skv, generator=g) > 0.3 if with_mask else None
    bias = torch.randn(1, 4, sq, skv, generator=g, dtype=torch.float64) if with_mask else None
    kw = dict(method="grouped", causal=causal, mask=mask, bias=bias, **make(g))
    ref = az.attention(q, k, v, backend="reference", **kw)
    out = az.attention(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("params", "skv", "needle"),
    [(dict(group_ids=torch.zeros(5, dtype=torch.long)), 8, "group_ids"),
     (dict(group_ids=torch.zeros(8)), 8, "integer"),
     (dict(group_ids=torch.zeros(8, dtype=torch.long)), 6, "kv_group_ids")],
)
def test_grouped_errors(params, skv, needle):
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, skv, 4)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, k, k, method="grouped", **params)
