"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.attention_gate import AttentionGate, AttentionGatePress, train_attention_gate
from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press
from attnzoo.kv.presses.lococo import LoCoCoPress, fit_lococo
from attnzoo.kv.presses.moa import MoAPress, profile_moa
from attnzoo.kv.presses.temporal_merge import TemporalMergePress

__all__ = [
    "AttentionGate",
    "AttentionGatePress",
    "LoCoCoPress",
    "MoAPress",
    "Press",
    "PressContext",
    "PressInfo",
    "ScorerPress",
    "TemporalMergePress",
    "fit_lococo",
    "presses",
    "profile_moa",
    "register_press",
    "train_attention_gate",
]
