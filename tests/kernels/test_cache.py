"""kernels.cache: the one least-recently-used cache of tilings, layouts and block masks."""

from __future__ import annotations

from attnzoo.kernels.cache import LRUCache


def test_lru_cache_keeps_the_recently_used_and_evicts_the_least() -> None:
    cache: LRUCache[str] = LRUCache(2)
    builds: list[str] = []

    def build(key: str):
        return lambda: builds.append(key) or key.upper()

    assert cache.get("a", build("a")) == "A"
    assert cache.get("b", build("b")) == "B"
    assert cache.get("a", build("a")) == "A"  # a hit: built once, now the most recent
    assert cache.get("c", build("c")) == "C"  # full: evicts b, the least recently used
    assert cache.get("a", build("a")) == "A"
    assert cache.get("b", build("b")) == "B"  # rebuilt
    assert builds == ["a", "b", "c", "b"]
    assert len(cache) == 2
