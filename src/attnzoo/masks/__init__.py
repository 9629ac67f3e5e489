"""Mask predicates (FlexAttention ``mask_mod``s) by concept, in dense and block form.

One concept per module, in the style of attention-gym's ``masks/`` and ``mods/``:

- :mod:`~attnzoo.masks.core` — the predicate type, causal/full, dense and row-block evaluation, combinators
  (re-exported here: ``masks.dense``, ``masks.causal``, ...);
- :mod:`~attnzoo.masks.layouts` — row-major layouts: per-axis coordinates and the one per-axis AND combinator
  (:func:`~attnzoo.masks.layouts.per_axis`) every N-d predicate is built with; axial lines;
- :mod:`~attnzoo.masks.neighborhood` — NATTEN neighborhoods and their strided generalisation (GNA), one axis rule;
- :mod:`~attnzoo.masks.windows` — sliding, dilated and halo windows;
- :mod:`~attnzoo.masks.partitions` — non-overlapping partitions: windows, grids, block tables;
- :mod:`~attnzoo.masks.groups` — documents, instances, latent groups;
- :mod:`~attnzoo.masks.positional` — masks from position ids (concentric rings);
- :mod:`~attnzoo.masks.radial` — radial attention's token and block rules;
- :mod:`~attnzoo.masks.mods` — score modifiers (ALiBi, soft-capping).

Every predicate is written with elementwise tensor ops only, so one definition serves the dense references
(:func:`dense`), the cached FlexAttention block masks (:func:`attnzoo.kernels.flex.block_mask`) and the tile masks of
the blockwise ``torch`` paths. Predicates carry descriptive ``__name__``s (``neighborhood_mod``, ``halo_mod``, ...).
"""

from attnzoo.masks.core import (
    MaskMod,
    and_masks,
    causal,
    combine,
    dense,
    dense_rows,
    full,
    or_masks,
    pairs,
    rows,
)

__all__ = ["MaskMod", "and_masks", "causal", "combine", "dense", "dense_rows", "full", "or_masks", "pairs", "rows"]
