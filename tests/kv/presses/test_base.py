"""The press interface's argument checks (``attnzoo.kv.presses.base``): each error names the argument."""

from __future__ import annotations

import pytest

from attnzoo.errors import AttnzooError
from attnzoo.kv.presses.base import check_integer, check_number, check_positive


def test_check_number_names_the_argument() -> None:
    with pytest.raises(AttnzooError, match="alpha: expected a positive number, got True"):
        check_number("alpha", True, lambda x: x > 0, "a positive number")


@pytest.mark.parametrize("value", [0, -3, 2.0, True, None])
def test_check_positive_names_the_argument_and_says_what(value: object) -> None:
    with pytest.raises(AttnzooError, match=r"^size: expected an integer >= 1 \(slots\), got"):
        check_positive("size", value, "slots")


def test_check_integer_takes_its_minimum() -> None:
    check_integer("n_sink", 0, 0)
    with pytest.raises(AttnzooError, match=r"^n_sink: expected an integer >= 0, got -1"):
        check_integer("n_sink", -1, 0)
