"""Layout predicates against brute force: axial attention along one axis of an N-d layout."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.layouts import axial


@pytest.mark.parametrize(("layout", "axis", "causal"), [((4, 5), 0, False), ((4, 5), 1, True), ((2, 3, 4), 1, True)])
def test_axial_predicate_matches_brute_force(layout, axis, causal):
    coords = list(itertools.product(*(range(n) for n in layout)))
    want = torch.tensor([[all(a == b for i, (a, b) in enumerate(zip(xq, xk, strict=True)) if i != axis)
                          and (not causal or xk[axis] <= xq[axis]) for xk in coords] for xq in coords])
    n = len(coords)
    assert torch.equal(masks.dense(axial(layout, axis, causal), 1, 1, n, n, "cpu")[0, 0], want)
