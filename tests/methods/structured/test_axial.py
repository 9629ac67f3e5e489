"""P4 axial attention on 2-D/3-D layouts (the conformance suite sees only 1-D): the SDPA path against the reference,
and layout/axis errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_decodes, assert_matches_reference, qkv


@pytest.mark.parametrize(
    ("layout", "axis", "causal"),
    [((5, 6), 1, False), ((5, 6), 0, True), ((5, 6), None, False), ((2, 3, 5), None, True), ((2, 3, 5), -2, False)],
)
def test_axial_sdpa_matches_reference(layout, axis, causal):
    q, k, v = qkv(2, 4, 2, 30, 8, 6, requires_grad=True)
    assert_matches_reference("axial", q, k, v, causal=causal, backend="sdpa", layout=layout, axis=axis)


@pytest.mark.parametrize(("layout", "axis", "causal"), [((5, 6), 1, False), ((2, 3, 5), -2, True), (None, None, True)])
def test_axial_one_stage_returns_the_log_sum_exp(layout, axis, causal):
    q, k, v = qkv(2, 4, 2, 30, requires_grad=True)
    assert_matches_reference("axial", q, k, v, causal=causal, backend="sdpa", layout=layout, axis=axis,
                             return_lse=True)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_axial_over_several_axes_has_no_log_sum_exp(backend):
    q = torch.randn(1, 2, 30, 8)
    with pytest.raises(AttnzooError, match="return_lse"):
        az.attention(q, q, q, method="axial", layout=(5, 6), backend=backend, return_lse=True)


@pytest.mark.parametrize(("params", "needle"), [(dict(layout=(5, 7)), "layout"), (dict(layout=(5, 6), axis=2), "axis")])
def test_axial_errors(params, needle):
    q = torch.randn(1, 2, 30, 8)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, q, q, method="axial", **params)


@pytest.mark.parametrize("params", [{}, {"layout": (5, 6)}, {"layout": (5, 6), "axis": 0},
                                    {"layout": (2, 3, 5), "axis": None}])
def test_axial_decodes_ragged_prompts_that_start_the_layout(params: dict) -> None:
    assert_decodes("axial", *qkv(2, 4, 2, 30), [11, 6], **params)
