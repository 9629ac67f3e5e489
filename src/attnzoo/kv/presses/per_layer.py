"""PerLayerPress — a different press (or compression ratio) for each attention layer.

The layer is the one ``attnzoo.prefill(..., layer=i)`` was given (:attr:`PressContext.layer`). ``presses`` maps a
layer index to its press (a mapping, or a sequence indexed by layer); a layer without one gets ``default`` (None:
its cache is left as it is). :meth:`PerLayerPress.from_ratios` builds one from a scoring press and a ratio per layer,
as kvpress's ``PerLayerCompressionPress`` does (e.g. PyramidKV-like schedules: more tokens in the first layers).
A layer index is required: a cache pressed without one raises, rather than silently using some layer's press.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from attnzoo.errors import fail
from attnzoo.kv.presses.base import Press, PressContext, ScorerPress, check_ratio, register_press


@dataclass(frozen=True)
class PerLayerPress(Press):
    """``presses``: ``{layer: press}`` or ``[press of layer 0, press of layer 1, …]`` (None: no press);
    ``default``: the press of the other layers (None: none)."""

    presses: Mapping[int, Press | None] | Sequence[Press | None]
    default: Press | None = None

    def __post_init__(self) -> None:
        by_layer = self.presses
        if isinstance(by_layer, Sequence) and not isinstance(by_layer, (str, bytes)):
            by_layer = dict(enumerate(by_layer))
        if not isinstance(by_layer, Mapping):
            raise fail("presses", "a mapping {layer: press} or a sequence of presses by layer", repr(self.presses))
        for layer, p in by_layer.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise fail("presses", "non-negative integer layer indices", repr(layer))
            if p is not None and not isinstance(p, Press):
                raise fail("presses", f"a press (or None) for layer {layer}", type(p).__name__)
        if self.default is not None and not isinstance(self.default, Press):
            raise fail("default", "a press or None", type(self.default).__name__)
        object.__setattr__(self, "presses", dict(by_layer))

    @classmethod
    def from_ratios(cls, press: Press, ratios: Sequence[float] | Mapping[int, float]) -> PerLayerPress:
        """``press`` (a scoring press, or a wrapper of one such as AdaKVPress) with ``ratios[layer]`` as its
        compression ratio in each layer."""
        items = ratios.items() if isinstance(ratios, Mapping) else enumerate(ratios)
        by_layer: dict[int, Press | None] = {}
        for layer, ratio in items:
            check_ratio(ratio, f"ratios[{layer}]")
            by_layer[layer] = with_ratio(press, ratio)
        return cls(by_layer)

    def press_of(self, context: PressContext) -> Press | None:
        if context.layer is None:
            raise fail("layer", "a layer index (attnzoo.prefill(..., layer=i)) for a PerLayerPress", None)
        return self.presses.get(context.layer, self.default)  # type: ignore[union-attr]

    def compress(self, cache: Any, context: PressContext) -> Any:
        press = self.press_of(context)
        return cache if press is None else press.compress(cache, context)

    def step(self, cache: Any, context: PressContext) -> Any:
        press = self.press_of(context)
        return cache if press is None else press.step(cache, context)


def with_ratio(press: Press, ratio: float) -> Press:
    """``press`` with compression ratio ``ratio``: a :class:`ScorerPress` directly (its ``budget`` cleared), a
    wrapper through its ``press`` field."""
    if isinstance(press, ScorerPress):
        return replace(press, compression_ratio=ratio, budget=None)
    if "press" in {f.name for f in fields(press)}:  # type: ignore[arg-type]
        return replace(press, press=with_ratio(press.press, ratio))  # type: ignore[attr-defined]
    raise fail("press", "a ScorerPress or a press wrapping one (for per-layer ratios)", type(press).__name__)


register_press(PerLayerPress, "K1", "kvpress (NVIDIA): PerLayerCompressionPress", None,
               "wraps presses: a press (or a compression ratio) per attention layer", needs=("press", "layer"))
