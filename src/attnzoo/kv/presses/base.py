"""The press interface: what every KV-cache compression method (K2–K10, K14, K16) implements.

A *press* transforms one attention layer's :class:`~attnzoo.kv.cache.KVCache`. It is applied by
``attnzoo.prefill(..., press=p)`` after the prompt has been attended in full (:meth:`Press.compress`), and after every
decoding step (:meth:`Press.step`; the default keeps the cache as it is). What a press may read is in its
:class:`PressContext`: the queries just processed (the whole prompt's at prefill, the step's at a step), the scale,
the method and the layer index.

Most presses only *score* slots: they subclass :class:`ScorerPress` and implement :meth:`ScorerPress.score`; the base
keeps the top slots of each ``(sequence, kv head)`` row. ``compression_ratio`` is the fraction of each sequence's
tokens removed (kvpress's convention: ``kept = tokens − floor(tokens · ratio)``); ``budget`` instead keeps at most
that many tokens. Sequences of different lengths each keep their own share (shorter rows get empty slots).

Every press file registers its class with :func:`register_press` (its catalogue ID, paper and summary): the registry
is what ``attnzoo list --presses``, the conformance tests and the press benchmarks walk. A press is built for a cache
budget (the fraction of tokens, or of bytes, kept) by :meth:`Press.for_budget`.

The presses' argument checks live here too: :func:`check_integer`, :func:`check_positive`, :func:`check_number`,
:func:`check_fraction`, :func:`check_ratio`.

Helpers every scoring press needs: :func:`recent_queries` (each sequence's last ``w`` queries and their positions,
right padding respected) and :func:`attention_weights` (softmax weights of given queries over the cache's slots,
causal, empty slots excluded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.ragged import RaggedKVCache


@dataclass(frozen=True)
class PressContext:
    """What a press may read besides the cache: ``queries (B, H, S, D)`` of the tokens just processed (positions: the
    last ``S`` of each sequence, right-padded at prefill), the ``scale``, the ``method``, the ``layer`` index (None on
    raw tensors) and the ``phase`` (``"prefill"`` or ``"step"``)."""

    queries: torch.Tensor
    scale: float
    method: str
    layer: int | None = None
    phase: str = "prefill"


class Press:
    """A transformation of a layer's KV cache. Subclasses implement :meth:`compress` (and :meth:`step` for decoding-time
    behaviour). A press is a frozen dataclass: its configuration; what it learns per sequence lives in the cache."""

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        """The cache after the prompt (called once, after the whole prompt was attended)."""
        raise NotImplementedError

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        """The cache after a decoding step (the step's token already appended). Default: unchanged."""
        return cache

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """This press configured to keep ``fraction`` (in (0, 1]) of the cache: tokens, or bytes for presses that
        shrink each token (quantisation, projection). ``options`` are passed to the constructor."""
        raise NotImplementedError


@dataclass(frozen=True)
class ScorerPress(Press):
    """A press that scores slots and keeps the best: ``compression_ratio`` in [0, 1) (fraction of tokens removed) or
    ``budget`` (tokens kept per sequence and kv head). Subclasses implement :meth:`score`."""

    compression_ratio: float = 0.0
    budget: int | None = None

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        if self.budget is not None:
            check_positive("budget", self.budget, "tokens kept per sequence and kv head, or None")

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        """``(B, Hkv, L)``: how much each slot is worth keeping (higher is kept first)."""
        raise NotImplementedError

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        return cls(compression_ratio=1.0 - fraction, **options)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        require_slots(cache)
        scores = self.score(cache, context)
        return cache.keep(top_slots(scores, cache, kept_tokens(cache, self.compression_ratio, self.budget)))


@dataclass(frozen=True)
class PressInfo:
    """A registered press: its ``name`` (the class name), ``cls``, catalogue ``mechanism`` (K2…), ``paper``, ``arxiv``,
    one-line ``summary``, and ``needs``: what it reads beyond keys and values (``"queries"``, ``"training"``,
    ``"calibration"``...)."""

    name: str
    cls: type[Press]
    mechanism: str
    paper: str
    arxiv: str | None
    summary: str
    needs: tuple[str, ...] = ()


_PRESSES: dict[str, PressInfo] = {}


def register_press(
    cls: type[Press], mechanism: str, paper: str, arxiv: str | None, summary: str, needs: tuple[str, ...] = (),
) -> type[Press]:
    """Register a press class (called once at the bottom of each press file)."""
    if cls.__name__ in _PRESSES:
        raise ValueError(f"press {cls.__name__!r} is registered twice")
    _PRESSES[cls.__name__] = PressInfo(cls.__name__, cls, mechanism, paper, arxiv, summary, needs)
    return cls


def presses() -> list[PressInfo]:
    """Every registered press, in catalogue order (K2, K3, …), then by name."""
    return sorted(_PRESSES.values(), key=lambda p: (int(p.mechanism[1:]), p.name))


def require_slots(cache: object) -> None:
    """A scoring press reads keys slot by slot: a :class:`KVCache` (or a ragged one), not a cache whose tokens are
    stored in another form (quantised codes): compose such presses last."""
    if not isinstance(cache, (KVCache, RaggedKVCache)):
        raise fail("cache", "a KVCache or RaggedKVCache (a scoring press reads keys; put presses that quantise the "
                   "cache last in a composition)", type(cache).__name__)


def check_integer(name: str, value: int, minimum: int, what: str = "") -> None:
    """``value`` must be an integer ``>= minimum`` (an :class:`~attnzoo.errors.AttnzooError` naming ``name``; ``what``
    says what the number is)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(name, f"an integer >= {minimum}" + (f" ({what})" if what else ""), repr(value))


def check_positive(name: str, value: int, what: str = "") -> None:
    check_integer(name, value, 1, what)


def check_number(name: str, value: float, ok: Callable[[float], bool], expected: str) -> None:
    """``value`` must be a real number for which ``ok`` holds (else an error naming ``name``, saying ``expected``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise fail(name, expected, repr(value))


def check_fraction(name: str, value: float) -> None:
    check_number(name, value, lambda x: 0.0 <= x <= 1.0, "a fraction in [0, 1]")


def check_ratio(ratio: float, name: str = "compression_ratio") -> None:
    check_number(name, ratio, lambda x: 0.0 <= x < 1.0, "a fraction in [0, 1) (the share of tokens removed)")


def kept_tokens(cache: KVCache, ratio: float, budget: int | None = None) -> torch.Tensor:
    """``(B, Hkv)``: how many tokens each row keeps (``tokens − floor(tokens·ratio)``, or ``min(tokens, budget)``)."""
    tokens = cache.token_counts()
    if budget is not None:
        if budget > int(tokens.max()):
            raise fail("budget", f"at most the cache's {int(tokens.max())} tokens", budget)
        return tokens.clamp(max=budget)
    return tokens - torch.floor(tokens * ratio).long()


def top_slots(scores: torch.Tensor, cache: KVCache, keep: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, max keep)`` slot indices: each row's ``keep[b, h]`` best-scored occupied slots, in position order,
    then ``-1`` for empty. Ties go to the earlier slot."""
    if scores.shape != cache.positions.shape:
        raise fail("score", f"a (batch, kv_heads, slots) tensor of shape {tuple(cache.positions.shape)}",
                   tuple(scores.shape))
    width = int(keep.max()) if keep.numel() else 0
    s = scores.float().masked_fill(~cache.occupied(), -math.inf)
    best = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :width]  # stable: ties keep slot order
    rank = torch.arange(width, device=scores.device)
    index = torch.where(rank < keep.unsqueeze(-1), best, cache.slots)  # unused entries sort last
    index = index.sort(dim=-1).values
    return torch.where(index < cache.slots, index, -1)


def recent_queries(cache: KVCache, queries: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's last ``window`` queries ``(B, H, w, D)`` and their positions ``(B, 1, w, 1)``.

    ``queries (B, H, S, D)`` hold the last ``S`` tokens of each sequence, right-padded (sequence ``b``'s token at
    position ``p`` is row ``p − (length[b] − S_b)``, see :class:`PressContext`). Rows before a sequence's first token
    get position ``-1`` (they see nothing).
    """
    b, h, s, d = queries.shape
    w = min(window, s)
    length = cache.length.view(b, 1)
    start = length - s  # position of row 0 when the sequence filled all S rows
    q_pos = length - w + torch.arange(w, device=queries.device)  # (B, w) the last w positions
    row = (q_pos - start.clamp(min=0)).clamp(0, s - 1)
    picked = queries.gather(2, row.view(b, 1, w, 1).expand(b, h, w, d))
    return picked, torch.where(q_pos >= 0, q_pos, -1).view(b, 1, w, 1)


def attention_weights(cache: KVCache, q: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax weights ``(B, H, T, L)`` of queries ``q (B, H, T, D)`` at positions ``q_pos (B, 1, T, 1)`` over the
    cache's slots (causal; empty slots and rows of position ``-1`` get 0)."""
    seen = cache.visible_to(q_pos, q.shape[1]) & (q_pos >= 0)
    weights = torch.softmax(cache.scores(q, scale).float().masked_fill(~seen, -math.inf), -1)  # one fused kernel
    alive = seen.any(-1, keepdim=True)
    return weights if bool(alive.all()) else torch.where(alive, weights, 0.0)  # rows that see nothing: NaN → 0
