"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Wrappers any scoring press can use (registered under K1): :class:`AdaKVPress` (per-head budgets in a ragged cache),
:class:`ComposedPress`, :class:`PerLayerPress`, :class:`DecodingPress` (decoding-time compression) and
:class:`AppendOnlyPress` (keep/skip once per token, for paged caches).

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.adakv import AdaKVPress
from attnzoo.kv.presses.append_only import AppendOnlyPress
from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press
from attnzoo.kv.presses.composed import ComposedPress
from attnzoo.kv.presses.decoding import DecodingPress
from attnzoo.kv.presses.per_layer import PerLayerPress

__all__ = [
    "AdaKVPress",
    "AppendOnlyPress",
    "ComposedPress",
    "DecodingPress",
    "PerLayerPress",
    "Press",
    "PressContext",
    "PressInfo",
    "ScorerPress",
    "presses",
    "register_press",
]
