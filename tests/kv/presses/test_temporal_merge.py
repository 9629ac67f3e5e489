"""K14 TemporalMergePress: duplicates across frames merge, merged slots weigh as the tokens they replace, ratios."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.presses import TemporalMergePress
from tests.helpers import F64


def video(frames: int, tpf: int, static: list[int], b: int = 1, hkv: int = 1, d: int = 8, seed: int = 0):
    """Keys of ``frames`` frames where the tokens ``static`` of each frame repeat frame 0's key exactly."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, frames * tpf, d, generator=gen, dtype=F64)
    for f in range(1, frames):
        for t in static:
            k[:, :, f * tpf + t] = k[:, :, t]
    v = torch.randn(b, hkv, frames * tpf, d, generator=gen, dtype=F64)
    q = torch.randn(b, 2 * hkv, frames * tpf, d, generator=gen, dtype=F64)
    return q, k, v


def test_identical_keys_merge_and_keep_their_weight() -> None:
    q, k, v = video(frames=3, tpf=4, static=[0, 2])
    press = TemporalMergePress(tokens_per_frame=4, threshold=0.999)
    _, full = az.prefill(q, k, v, method="softmax")
    _, state = az.prefill(q, k, v, method="softmax", press=press)
    cache = state.data
    assert int(cache.token_counts().max()) == 12 - 4  # 2 static tokens × 2 later frames merged
    counts = cache.log_weight.exp()[0, 0]
    assert sorted(counts.round().tolist()) == [1.0] * 6 + [3.0, 3.0]
    merged = cache.positions[0, 0][counts.round() == 3].tolist()
    assert sorted(merged) == [8, 10]  # a merged slot takes its newest token's position
    probe = torch.randn(1, 2, 1, 8, dtype=F64)  # identical keys: the merged slot weighs as its 3 tokens, exactly
    assert torch.allclose(softmax_attention(cache, probe, 0.3), softmax_attention(full.data, probe, 0.3))


def test_ratio_merges_the_most_similar_links_and_is_honoured() -> None:
    q, k, v = video(frames=4, tpf=4, static=[1])
    k[:, :, 4:] += 0.01 * torch.randn_like(k[:, :, 4:])
    _, state = az.prefill(q, k, v, method="softmax", press=TemporalMergePress(tokens_per_frame=4,
                                                                                 compression_ratio=0.25))
    assert int(state.data.token_counts().max()) == 12
    counts = state.data.log_weight.exp()[0, 0].round()
    assert counts.max() == 4 and counts.sum() == 16  # the static token's chain took the 3 links + one more


def test_steps_merge_each_completed_frame_and_ragged_batches_work() -> None:
    tpf = 3
    q, k, v = video(frames=4, tpf=tpf, static=[0, 1, 2], b=2, hkv=2)  # a static video: every frame repeats frame 0
    lengths = torch.tensor([6, 4])
    press = TemporalMergePress(tokens_per_frame=tpf, threshold=0.999)
    args = (q[:, :, :6], k[:, :, :6], v[:, :, :6])
    _, state = az.prefill(*args, method="softmax", lengths=lengths, press=press)
    _, full = az.prefill(*args, method="softmax", lengths=lengths)
    assert state.data.token_counts().tolist() == [[3, 3], [4, 4]]  # seq 1's second frame is not complete yet
    for t in range(6):
        token = [torch.stack([x[i, :, int(lengths[i]) + t] for i in range(2)]).unsqueeze(2) for x in (q, k, v)]
        out, state = az.step(state, *token)
        out_full, full = az.step(full, *token)
        assert torch.allclose(out, out_full)  # merged identical keys: attention unchanged
    assert state.data.token_counts().tolist() == [[3, 3], [4, 4]]  # seq 1: 3 chains + frame 3's first token
    counts = state.data.log_weight.exp().round() * state.data.occupied()
    assert counts.sum(-1).tolist() == [[12, 12], [10, 10]]


def test_a_merged_slot_holds_the_mean_value_and_the_log_count() -> None:
    q, k, v = video(frames=5, tpf=2, static=[0, 1])
    _, pressed = az.prefill(q, k, v, method="softmax", press=TemporalMergePress(tokens_per_frame=2, threshold=0.99))
    cache = pressed.data
    assert cache.positions[0, 0].tolist() == [8, 9]
    assert torch.allclose(cache.keys[0, 0], k[0, 0, :2])
    assert torch.allclose(cache.values[0, 0, 0], v[0, 0, 0::2].mean(0))
    assert torch.allclose(cache.log_weight[0, 0], torch.log(torch.tensor([5.0, 5.0], dtype=F64)))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"tokens_per_frame": 0}, "tokens_per_frame"),
    ({"tokens_per_frame": 4, "threshold": 1.5}, "threshold"),
    ({"tokens_per_frame": 4, "compression_ratio": 1.0}, "compression_ratio"),
])
def test_bad_arguments_are_named(kwargs, name) -> None:
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        TemporalMergePress(**kwargs)


def test_for_budget() -> None:
    press = TemporalMergePress.for_budget(0.5, tokens_per_frame=4)
    assert press.compression_ratio == 0.5
