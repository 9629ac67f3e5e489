"""Mask building blocks against explicit loops: the bottom-right causal predicate, the and/or combinators, rows of a
dense mask, and combining causal with a user mask."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo import masks


@pytest.mark.parametrize(("sq", "skv"), [(5, 5), (3, 8), (8, 3), (1, 6)])
def test_causal_predicate_against_loops(sq, skv):
    got = masks.dense(masks.causal(sq, skv), 1, 1, sq, skv, "cpu")[0, 0]
    for i, j in itertools.product(range(sq), range(skv)):
        assert bool(got[i, j]) == (j - i <= skv - sq)  # bottom-right: the last query sees every key


def test_combinators_and_rows():
    both = masks.and_masks(masks.causal(6, 6), lambda b, h, q, kv: kv % 2 == 0)
    either = masks.or_masks(masks.causal(6, 6), lambda b, h, q, kv: kv == 5)
    d_both = masks.dense(both, 1, 1, 6, 6, "cpu")[0, 0]
    d_either = masks.dense(either, 1, 1, 6, 6, "cpu")[0, 0]
    for i, j in itertools.product(range(6), range(6)):
        assert bool(d_both[i, j]) == (j <= i and j % 2 == 0)
        assert bool(d_either[i, j]) == (j <= i or j == 5)
    rows = masks.dense_rows(both, 1, 1, 2, 4, 6, "cpu")
    assert torch.equal(rows, masks.dense(both, 1, 1, 6, 6, "cpu")[..., 2:4, :])
    user = torch.rand(1, 1, 6, 6) < 0.5
    combined = masks.combine(True, user, 6, 6, "cpu")
    assert torch.equal(combined, user & torch.tril(torch.ones(6, 6, dtype=torch.bool)))
