"""ComposedPress — several presses applied in order (e.g. a scoring press, then a quantising one).

After the prompt, ``compress`` runs each press's :meth:`~attnzoo.kv.presses.base.Press.compress` on the previous
one's result; after each decoding step, ``step`` runs each press's ``step`` in the same order. Every press sees the
same :class:`~attnzoo.kv.presses.base.PressContext`. The order matters: a press that drops tokens before one that
shrinks each token is the usual choice (the second works on fewer tokens). A press that returns a
:class:`~attnzoo.kv.ragged.RaggedKVCache` (:class:`~attnzoo.kv.presses.adakv.AdaKVPress`) should come last unless
the presses after it accept ragged caches. (kvpress's ``ComposedPress`` has the same meaning.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attnzoo.errors import fail
from attnzoo.kv.presses.base import Press, PressContext, register_press


@dataclass(frozen=True)
class ComposedPress(Press):
    """``presses`` (a non-empty sequence of presses) applied in order, at prefill and after each step."""

    presses: Sequence[Press]

    def __post_init__(self) -> None:
        if isinstance(self.presses, Press) or not isinstance(self.presses, Sequence) or not self.presses:
            raise fail("presses", "a non-empty sequence of presses", repr(self.presses))
        for p in self.presses:
            if not isinstance(p, Press):
                raise fail("presses", "presses only (attnzoo.kv.presses)", type(p).__name__)
        object.__setattr__(self, "presses", tuple(self.presses))

    def compress(self, cache: Any, context: PressContext) -> Any:
        for p in self.presses:
            cache = p.compress(cache, context)
        return cache

    def step(self, cache: Any, context: PressContext) -> Any:
        for p in self.presses:
            cache = p.step(cache, context)
        return cache


register_press(ComposedPress, "K1", "kvpress (NVIDIA): ComposedPress", None,
               "wraps presses: applies them in order, at prefill and after each decoding step", needs=("press",))
