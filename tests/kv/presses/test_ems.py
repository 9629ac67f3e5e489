from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.presses import EMSPress, H2OPress
from attnzoo.kv.presses.ems import merge_evicted
from tests.helpers import qkv
from tests.kv.presses.patterns import focused, kept_positions, prompt


def test_global_and_local_attention_pick_the_slots() -> None:
    targets = {i: [t for t in (0, 1, 7) if t <= i] for i in range(12)}
    cache, context = prompt(*focused(12, targets, heads=2))
    out = EMSPress(budget=5, window_size=2).compress(cache, context)
    assert kept_positions(out) == [0, 1, 7, 10, 11]
    assert out.log_weight is None  # one-hot keys are orthogonal: nothing similar enough to merge (zero class)


def test_global_score_does_not_penalise_late_tokens() -> None:
    """Slot 0 is read by 6 of the 12 queries that see it, slot 9 by 2 of 3: H2O's sum keeps 0, EMS's mean keeps 9."""
    targets = {**{i: [0] for i in range(6)}, 6: [6], 7: [7], 8: [8], 9: [9], 10: [9], 11: [11]}
    cache, context = prompt(*focused(12, targets))
    assert kept_positions(EMSPress(budget=2, window_size=1).compress(cache, context)) == [9, 11]
    assert kept_positions(H2OPress(budget=2, recent_fraction=0.5).compress(cache, context)) == [0, 11]


def test_merging_identical_tokens_keeps_the_attention_output() -> None:
    q, k, v = qkv(2, 4, 2, 16, seed=0)
    k[:, :, 4:], v[:, :, 4:] = k[:, :, 3:4], v[:, :, 3:4]  # tokens 3..15 are one token repeated
    cache, _ = prompt(q, k, v, lengths=torch.tensor([16, 13]))
    index = torch.tensor([0, 1, 2, 3, 12]).expand(2, 2, 5)  # keep 0..3 and 12; the other copies are evicted
    merged = merge_evicted(cache, index, threshold=0.999, block=4)
    assert merged.log_weight.exp()[:, :, 3].tolist() == [[12.0, 12.0], [9.0, 9.0]]  # 3 and the copies it absorbed
    new = qkv(2, 4, 2, 1, seed=5)
    full, pressed = cache.append(*new[1:]), merged.append(*new[1:])
    torch.testing.assert_close(softmax_attention(pressed, new[0], 0.3), softmax_attention(full, new[0], 0.3))


def test_every_token_stays_counted_across_presses() -> None:
    q, k, v = qkv(1, 2, 1, 24, seed=1)
    k = k.sign()  # many keys alike: merges happen
    _, state = az.prefill(q, k, v, method="softmax", press=EMSPress(compression_ratio=0.5, window_size=4,
                                                                     merge_threshold=0.3))
    cache = state.data
    assert cache.token_counts().item() == 12
    assert cache.log_weight is not None and cache.log_weight.exp().sum().item() <= 24.0 + 1e-4
    again = merge_evicted(cache, torch.arange(6).view(1, 1, 6), threshold=-1.0, block=5)  # everything merges
    assert again.log_weight.exp().sum().item() == pytest.approx(cache.log_weight.exp().sum().item(), rel=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(AttnzooError, match="merge_threshold"):
        EMSPress(merge_threshold=1.5)
    with pytest.raises(AttnzooError, match="window_size"):
        EMSPress(window_size=0)
