"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press
from attnzoo.kv.presses.dapq import DapQPress
from attnzoo.kv.presses.ems import EMSPress
from attnzoo.kv.presses.h2o import H2OPress
from attnzoo.kv.presses.knorm import KnormPress
from attnzoo.kv.presses.lazy_eviction import LazyEvictionPress
from attnzoo.kv.presses.matryoshka import MatryoshkaKVPress
from attnzoo.kv.presses.razor_attention import RazorAttentionPress
from attnzoo.kv.presses.rotatekv import RotateKVPress
from attnzoo.kv.presses.snapkv import SnapKVPress
from attnzoo.kv.presses.streaming_llm import StreamingLLMPress

__all__ = [
    "DapQPress",
    "EMSPress",
    "H2OPress",
    "KnormPress",
    "LazyEvictionPress",
    "MatryoshkaKVPress",
    "Press",
    "PressContext",
    "PressInfo",
    "RazorAttentionPress",
    "RotateKVPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "presses",
    "register_press",
]
