"""P10 group masks: the segment path against the reference (per-batch ids, cross ids, groups without keys, user
masks), and id validation."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_matches_reference, qkv

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
    q, k, v = qkv(2, 4, 2, sq, 8, 6, skv=skv, seed=g, requires_grad=True)
    mask = torch.rand(2, 1, sq, skv, generator=g) > 0.3 if with_mask else None
    bias = torch.randn(1, 4, sq, skv, generator=g, dtype=torch.float64) if with_mask else None
    assert_matches_reference("grouped", q, k, v, causal=causal, mask=mask, bias=bias, **make(g))


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
