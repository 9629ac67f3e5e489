"""KV-cache presses (K2–K10, K14, K16), one per file; the interface is in :mod:`attnzoo.kv.presses.base`.

Importing this package imports every press file, which registers it (:func:`~attnzoo.kv.presses.base.presses`).
"""

from attnzoo.kv.presses.adakv import AdaKVPress
from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress, presses, register_press

__all__ = ["AdaKVPress", "Press", "PressContext", "PressInfo", "ScorerPress", "presses", "register_press"]
