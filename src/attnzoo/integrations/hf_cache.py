"""A transformers ``Cache`` whose layers hold attnzoo decoding states: what a press around ``generate()`` really
shrinks, and what a sliding window or a linear method really holds.

:func:`attnzoo.integrations.transformers.decoding` (and :func:`~attnzoo.integrations.transformers.press`) puts a
:class:`PressedCache` where ``generate()`` (or a forward with ``use_cache=True``) would use its own ``DynamicCache``.
Each layer (:class:`PressedLayer`) holds one :class:`attnzoo.DecodeState` of the layer's method: its data is a
:class:`~attnzoo.kv.cache.KVCache` for methods that decode through one (a ring of ``window + 1`` slots for
``sliding_window``; a :class:`~attnzoo.kv.ragged.RaggedKVCache` after a per-head press), the fixed-size state for the
linear family. Under a press the prompt's keys are compressed right after the prompt is attended; each step
continues the state by one token (and runs the press's ``step``); nothing else is stored, so the memory transformers
holds for the cache is the memory attnzoo holds.

How it meets transformers' ``Cache`` interface (``transformers.cache_utils``; checked on 5.24):

- ``update(keys, values)`` (called by the attention module before attention) does not store: it hands the new tokens'
  keys and values to the attention function (``pending``), which attends through the layer's state and stores the
  result (:func:`attnzoo.integrations.transformers.attend`). A second update before attention took the first one's
  keys means the model does not attend by an attnzoo implementation: refused.
- ``get_seq_length()`` is the number of token columns seen (real tokens and left padding, as transformers counts
  them): generate slices inputs and builds positions from it, so positions (RoPE) stay the true ones after compression.
- ``get_mask_sizes(q)`` is ``(kept slots + q, 0)`` (``(q, 0)`` for a fixed-size state): the mask transformers builds
  has one column per kept slot. It cannot say which position a slot holds (the interface gives a length and an
  offset, and kept slots are not a contiguous range of positions), so after the prompt the attention function reads
  visibility from the attnzoo state itself and ignores that mask; at the prompt (nothing kept yet) the mask is exact
  and gives the padding.
- Beam search (``reorder_cache``), assisted decoding and rollbacks (``crop``) and batch reshaping after the prompt are
  refused: the tokens a press dropped cannot be restored, and the per-sequence state is not reordered here.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

import attnzoo
from attnzoo.errors import fail
from attnzoo.integrations.transformers import require_transformers
from attnzoo.registry import get

require_transformers()
cache_utils = importlib.import_module("transformers.cache_utils")


class PressedLayer(cache_utils.CacheLayerMixin):
    """One layer of a :class:`PressedCache`: an :class:`attnzoo.DecodeState` (None before the prompt), the new
    tokens' keys and values between ``update`` and attention (``pending``) and the columns ``seen``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs: Any) -> None:
        self.state: attnzoo.DecodeState | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0
        self.token_bytes = 0  # what one token column of keys and values takes in a DynamicCache (all rows, heads)
        self.is_initialized = False

    @property
    def cache(self) -> Any:
        """The layer's attnzoo state data (a ``KVCache`` or ``RaggedKVCache``, or a linear method's fixed-size state:
        a tensor or a tuple of them), None before the prompt."""
        return None if self.state is None else self.state.data

    @property
    def holds_kv(self) -> bool:
        """Whether the state is a KV cache (its method decodes through one)."""
        return self.state is not None and get(self.state.method).decoder.kv_cache

    @property
    def keys(self) -> torch.Tensor | None:
        """The attnzoo cache's keys ``(B, Hkv, slots, D)`` (a ragged cache materialises its slot view: a copy); None
        for a fixed-size state."""
        return self.state.data.keys if self.holds_kv else None

    @property
    def values(self) -> torch.Tensor | None:
        return self.state.data.values if self.holds_kv else None

    @property
    def nbytes(self) -> int:
        """Bytes the layer holds: its attnzoo state (a cache's storage capacity, positions and press data included;
        each tensor of a fixed-size state)."""
        return 0 if self.state is None else sum(leaf.nbytes for leaf in tree_leaves(self.state.data))

    @property
    def full_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` layer would hold for the same tokens (every column's keys and values)."""
        return self.seen * self.token_bytes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.token_bytes = (key_states[:, :, :1].numel() * key_states.element_size()
                            + value_states[:, :, :1].numel() * value_states.element_size())
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the new tokens' keys and values to the attention function (which stores them); returns them."""
        if self.pending is not None:
            raise fail("cache", "each update read by an attnzoo attention function before the next one (a pressed "
                       "cache serves only models attending by attn_implementation='attnzoo_<method>')",
                       "a second update before attention")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending keys and values (once)."""
        assert self.pending is not None
        pending, self.pending = self.pending, None
        return pending

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kept slots + query_length, 0)`` (see the module: after the prompt the mask is not read)."""
        return (self.state.data.slots if self.holds_kv else 0) + query_length, 0

    def get_seq_length(self) -> int:
        """Token columns seen (left padding included, as transformers counts them)."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.pending, self.seen = None, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.seen:
            raise fail("cache", "no rollback of a pressed cache (assisted decoding, crop): the tokens a press "
                       "or a state dropped cannot be restored", f"crop({tokens_to_remove})")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise fail("num_beams", "1 with a press or azhf.decoding (their cache is not reordered for beam search)",
                   "beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_batch_change("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_batch_change("batch_select_indices")

    def _refuse_batch_change(self, what: str) -> None:
        if self.seen:
            raise fail("cache", "no change of the batch after the prompt (a cache of attnzoo states)", what)


class PressedCache(cache_utils.Cache):
    """A transformers ``Cache`` of :class:`PressedLayer` s (created as layers are first updated), serving the
    :class:`~attnzoo.integrations.transformers.Decoding` ``pressing`` (with a press or without) while its ``active``
    flag is set."""

    def __init__(self, pressing: Any) -> None:
        super().__init__(layer_class_to_replicate=PressedLayer)
        self.pressing = pressing

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not getattr(self.pressing, "active", False):
            raise fail("cache", "a pressed cache used within its press (with azhf.press(model, press): ..., or "
                       "azhf.decoding(model))",
                       "a call outside it")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (all layers)."""
        return sum(layer.nbytes for layer in self.layers)

