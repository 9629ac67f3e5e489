"""The standalone layers' shared argument checks: what passes, and errors naming the argument."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.nn.checks import padding_mask, positive_int, tokens


def test_valid_values_pass_through() -> None:
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert positive_int("n", 3) == 3
    assert tokens("x", x, 4) is x
    assert padding_mask(mask, x) is mask and padding_mask(None, x) is None


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: positive_int("depth", True), "depth"),
        (lambda: positive_int("depth", 0), "depth"),
        (lambda: tokens("x", torch.randn(2, 3), 3), "x"),
        (lambda: tokens("h", torch.ones(2, 3, 4, dtype=torch.long), 4), "h"),
        (lambda: padding_mask(torch.ones(2, 3), torch.randn(2, 3, 4)), "mask"),
        (lambda: padding_mask(torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 3, 4), "key_mask"), "key_mask"),
    ],
)
def test_bad_values_name_the_argument(call, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        call()
