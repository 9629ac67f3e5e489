"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press
from attnzoo.kv.presses.h2o import H2OPress
from attnzoo.kv.presses.knorm import KnormPress
from attnzoo.kv.presses.snapkv import SnapKVPress
from attnzoo.kv.presses.streaming_llm import StreamingLLMPress

__all__ = [
    "H2OPress",
    "KnormPress",
    "Press",
    "PressContext",
    "PressInfo",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "presses",
    "register_press",
]
