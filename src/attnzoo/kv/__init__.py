"""K — KV caches, decoding states and presses (KV-cache compression).

- :class:`~attnzoo.kv.cache.KVCache`: the cache softmax-form methods decode with (slots with positions; ragged
  batches; rings for windowed methods; compact caches after a press);
- :class:`~attnzoo.kv.ragged.RaggedKVCache`: a paged cache whose rows hold different numbers of tokens (per-head
  budgets), in memory for the kept tokens only;
- :func:`~attnzoo.kv.shared_prefix.shared_prefix_attention`: K11 Hydragen, exact attention for a batch sharing a
  prefix (the prefix attended once by all queries stacked, merged with each suffix by log-sum-exp), and
  :func:`~attnzoo.kv.shared_prefix.tree_prefix_attention`, its two-level tree (sub-prefixes shared by groups);
- :mod:`attnzoo.kv.ape`: K13 APE, contexts encoded in parallel after a shared prefix
  (:func:`~attnzoo.kv.ape.ape_encode`), then the query and decoding over their concatenated caches with APE's
  temperature and scaling (:func:`~attnzoo.kv.ape.ape_attention`, :func:`~attnzoo.kv.ape.ape_prefill` /
  :func:`~attnzoo.kv.ape.ape_step`);
- :mod:`attnzoo.kv.attend`: attention of new queries over a cache;
- :mod:`attnzoo.kv.mac`: K12 MAC-Attention decoding (reuse of a matching recent query's attention),
  :func:`~attnzoo.kv.mac.mac_prefill` / :func:`~attnzoo.kv.mac.mac_step`;
- :mod:`attnzoo.kv.presses`: one press per file, ``attnzoo.prefill(..., press=SnapKVPress(compression_ratio=0.5))``.
"""

from attnzoo.kv.ape import (
    APEState,
    ape_attention,
    ape_encode,
    ape_positions,
    ape_prefill,
    ape_reference,
    ape_step,
)
from attnzoo.kv.cache import KVCache
from attnzoo.kv.mac import MACState, mac_prefill, mac_step
from attnzoo.kv.ragged import RaggedKVCache
from attnzoo.kv.shared_prefix import shared_prefix_attention, tree_prefix_attention

__all__ = ["APEState", "KVCache", "MACState", "RaggedKVCache", "ape_attention", "ape_encode", "ape_positions",
           "ape_prefill", "ape_reference", "ape_step", "mac_prefill", "mac_step", "shared_prefix_attention",
           "tree_prefix_attention"]
