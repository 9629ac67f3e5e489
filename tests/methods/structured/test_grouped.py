"""P10 group masks: the segment path against the reference (per-batch ids, cross ids, groups without keys, user
masks), and id validation."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_decodes, assert_matches_reference, qkv

CASES = [
    (40, 40, False, lambda g: dict(group_ids=torch.randint(0, 4, (40,), generator=g))),
    (40, 40, True, lambda g: dict(group_ids=torch.randint(0, 4, (2, 40), generator=g))),
    (20, 40, True, lambda g: dict(group_ids=torch.randint(0, 4, (20,), generator=g),
                                  kv_group_ids=torch.randint(1, 5, (2, 40), generator=g))),  # group 0 has no key
    (40, 40, True, lambda g: dict()),
]


@pytest.mark.parametrize(("sq", "skv", "causal", "make"), CASES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize(("dv", "return_lse"), [(6, False), (8, True)])
def test_grouped_torch_matches_reference(sq, skv, causal, make, with_mask, dv, return_lse):
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 4, 2, sq, 8, dv, skv=skv, seed=g, requires_grad=True)
    mask = torch.rand(2, 1, sq, skv, generator=g) > 0.3 if with_mask else None
    bias = torch.randn(1, 4, sq, skv, generator=g, dtype=torch.float64) if with_mask else None
    assert_matches_reference("grouped", q, k, v, causal=causal, mask=mask, bias=bias, return_lse=return_lse,
                             **make(g))


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


def test_grouped_decodes_with_the_ids_of_each_step() -> None:
    q, k, v = qkv(2, 4, 2, 12)
    ids = torch.tensor([[0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0], [1, 1, 0, 0, 2, 2, 1, 0, 1, 2, 0, 0]])
    want = az.attention(q, k, v, method="grouped", causal=True, group_ids=ids, backend="reference")
    out, state = az.prefill(q[:, :, :7], k[:, :, :7], v[:, :, :7], method="grouped", group_ids=ids[:, :7])
    outs = [out]
    for t in range(7, 12):
        out, state = az.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                             group_ids=ids[:, t : t + 1])
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), want)
    assert state.data.slot_data["group_ids"][:, 0].tolist() == ids.tolist()
    with pytest.raises(AttnzooError, match="group_ids"):
        az.step(state, q[:, :, :1], k[:, :, :1], v[:, :, :1])


def test_grouped_decodes_shared_ids_and_ragged_prompts() -> None:
    q, k, v = qkv(2, 2, 2, 9)
    ids = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0, 1])
    want = az.attention(q, k, v, method="grouped", causal=True, group_ids=ids, backend="reference")
    out, state = az.prefill(q[:, :, :6], k[:, :, :6], v[:, :, :6], method="grouped", group_ids=ids[:6],
                            lengths=torch.tensor([6, 6]))
    torch.testing.assert_close(out, want[:, :, :6])
    out, state = az.step(state, q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], group_ids=ids[6:])
    torch.testing.assert_close(out, want[:, :, 6:])
    assert_decodes("grouped", q, k, v, [5, 3])  # no ids: one group
