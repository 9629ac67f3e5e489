"""The one exception type attnzoo raises for bad input."""

from __future__ import annotations


class AttnzooError(ValueError):
    """Bad input to an attnzoo call.

    Raised before any compute. The message names the argument, what was expected and what came, e.g.
    ``k: expected head_dim 64 (from q), got 32``.
    """


def fail(argument: str, expected: str, got: object) -> AttnzooError:
    """Build an :class:`AttnzooError` in the library's one message format."""
    return AttnzooError(f"{argument}: expected {expected}, got {got}")
