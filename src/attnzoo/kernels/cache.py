"""The one cache of the fast paths: least-recently-used, keyed by configuration and device.

What a fast path derives from its configuration alone (tilings, block layouts, FlexAttention block masks) costs far
more to build than to use, and the same configuration recurs across a model's layers and steps. Each kind of value
gets one bounded :class:`LRUCache` (its size set by what one entry can weigh), so a process that serves many
configurations keeps the recent ones and never grows without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most ``size`` values by key; :meth:`get` builds a missing one and evicts the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: dict[Hashable, V] = {}  # insertion order is recency order: a hit is moved to the end

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value cached under ``key``, or ``build()`` cached under it."""
        value = self._values.pop(key, None)
        if value is None:
            if len(self._values) >= self.size:
                self._values.pop(next(iter(self._values)))  # the least recently used
            value = build()
        self._values[key] = value
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()


configurations: LRUCache[Any] = LRUCache(8)  # a 1-D tiling for N=65536, k=1023 holds ~0.4 GiB of masks


def cached(key: Hashable, device: torch.device, build: Callable[[], V]) -> V:
    """``build()`` for a configuration ``key`` (tilings, block layouts, parts), built once per device and kept in the
    shared least-recently-used cache of 8 configurations."""
    return configurations.get((key, str(device)), build)
