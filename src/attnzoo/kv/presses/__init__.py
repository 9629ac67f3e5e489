"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Wrappers any scoring press can use (registered under K1): :class:`AdaKVPress` (per-head budgets in a ragged cache),
:class:`ComposedPress`, :class:`PerLayerPress`, :class:`DecodingPress` (decoding-time compression) and
:class:`AppendOnlyPress` (keep/skip once per token, for paged caches).

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.adakv import AdaKVPress
from attnzoo.kv.presses.append_only import AppendOnlyPress
from attnzoo.kv.presses.attention_gate import AttentionGate, AttentionGatePress, train_attention_gate
from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press
from attnzoo.kv.presses.composed import ComposedPress
from attnzoo.kv.presses.dapq import DapQPress
from attnzoo.kv.presses.decoding import DecodingPress
from attnzoo.kv.presses.ems import EMSPress
from attnzoo.kv.presses.h2o import H2OPress
from attnzoo.kv.presses.knorm import KnormPress
from attnzoo.kv.presses.lazy_eviction import LazyEvictionPress
from attnzoo.kv.presses.lococo import LoCoCoPress, fit_lococo
from attnzoo.kv.presses.matryoshka import MatryoshkaKVPress, calibrate_matryoshka, train_matryoshka
from attnzoo.kv.presses.moa import MoAPress, profile_moa
from attnzoo.kv.presses.per_layer import PerLayerPress
from attnzoo.kv.presses.razor_attention import RazorAttentionPress
from attnzoo.kv.presses.rotatekv import RotateKVPress
from attnzoo.kv.presses.snapkv import SnapKVPress
from attnzoo.kv.presses.streaming_llm import StreamingLLMPress
from attnzoo.kv.presses.temporal_merge import TemporalMergePress

__all__ = [
    "AdaKVPress",
    "AppendOnlyPress",
    "AttentionGate",
    "AttentionGatePress",
    "ComposedPress",
    "DapQPress",
    "DecodingPress",
    "EMSPress",
    "H2OPress",
    "KnormPress",
    "LazyEvictionPress",
    "LoCoCoPress",
    "MatryoshkaKVPress",
    "MoAPress",
    "PerLayerPress",
    "Press",
    "PressContext",
    "PressInfo",
    "RazorAttentionPress",
    "RotateKVPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TemporalMergePress",
    "calibrate_matryoshka",
    "fit_lococo",
    "presses",
    "profile_moa",
    "register_press",
    "train_attention_gate",
    "train_matryoshka",
]
