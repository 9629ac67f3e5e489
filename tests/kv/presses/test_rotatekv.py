"""K9 RotateKV: rotation and reordering undone exactly, the per-group error bound, sinks exact, real bytes, ragged
decoding, budgets and bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels.hadamard import hadamard
from attnzoo.kernels.quantize import from_bytes
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import RotateKVPress, presses
from attnzoo.kv.presses.base import PressContext
from attnzoo.kv.quantized import QuantizedKVCache, TokenCodec
from tests.helpers import qkv


def compress(press: RotateKVPress, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None):
    cache = KVCache.from_prompt(k, v, lengths)
    q = torch.zeros(k.shape[0], k.shape[1], k.shape[2], k.shape[3])
    return press.compress(cache, PressContext(q, 1.0, "softmax"))


def outlier_keys(b: int, hkv: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=g)
    k[..., 3] += 20.0  # an outlier channel in every head
    return k


def test_registered() -> None:
    info = next(p for p in presses() if p.cls is RotateKVPress)
    assert info.mechanism == "K9" and info.arxiv == "2501.16383"


def test_codec_undoes_rotation_and_order_within_the_quantisation_error() -> None:
    k = outlier_keys(2, 4, 40, 32)
    real = torch.ones(2, 40, dtype=torch.bool)
    codec = TokenCodec.build(k, k, real, bits=4, group=32, head_group=4)
    assert codec.block == 128
    assert torch.equal(codec.order.sort(-1).values, torch.arange(128).expand(2, 128))  # a permutation per sequence
    rows = codec.encode_keys(k)
    stored = from_bytes(rows[:, 0], 128, 4, 32)
    # rotations are orthonormal: a token's key error (L2) is the stored vector's, at most its groups' half-steps
    bound = (stored.scale.float() / 2).pow(2).mul(32).sum(-1).sqrt()
    err = (codec.decode_keys(rows) - k).transpose(1, 2).reshape(2, 40, 128).norm(dim=-1)
    assert bool((err <= bound * (1 + 1e-4) + 1e-5).all())
    # values: the rotated dequantised values, rotated back, are the values up to the same bound
    v = torch.randn(2, 4, 40, 32, generator=torch.Generator().manual_seed(3))
    v_rows = codec.encode_values(v)
    v_bound = (from_bytes(v_rows[:, 0], 128, 4, 32).scale.float() / 2).pow(2).mul(32).sum(-1).sqrt()
    v_err = (hadamard(codec.decode_values_rotated(v_rows)) - v).transpose(1, 2).reshape(2, 40, 128).norm(dim=-1)
    assert bool((v_err <= v_bound * (1 + 1e-4) + 1e-5).all())


def test_channel_order_sorts_each_sequences_rotated_channel_sums() -> None:
    """Calibrated per sequence on its own quantised tokens: padding and sinks do not enter it."""
    k = outlier_keys(2, 4, 30, 16)
    k[1, :, 20:] = float("nan")  # padding of the second sequence
    cache = compress(RotateKVPress(n_sink=2, group_size=16), k, k, torch.tensor([30, 20]))
    codec = cache.codec
    for b, n in ((0, 30), (1, 20)):
        sums = codec.rotate_keys(k[b : b + 1, :, 2:n]).sum(1)[0]
        assert torch.equal(codec.order[b], torch.sort(sums, stable=True).indices)
    alone = compress(RotateKVPress(n_sink=2, group_size=16), k[1:, :, :20], k[1:, :, :20])
    assert torch.equal(alone.codec.order[0], codec.order[1])


def test_sinks_exact_and_everything_else_quantised() -> None:
    _, k, v = qkv(2, 4, 4, 50, 16, dtype=torch.float32)
    cache = compress(RotateKVPress(n_sink=5), k, v, torch.tensor([50, 3]))
    assert isinstance(cache, QuantizedKVCache)
    assert cache.sinks.positions[0, 0].tolist() == [0, 1, 2, 3, 4]
    assert cache.sinks.positions[1, 0].tolist() == [0, 1, 2, -1, -1]  # a 3-token prompt has 3 sinks
    assert torch.equal(cache.sinks.keys[0], k[0, :, :5]) and torch.equal(cache.sinks.values[0], v[0, :, :5])
    assert torch.equal(cache.sinks.keys[1, :, :3], k[1, :, :3])
    assert cache.rows.keys.dtype == torch.uint8 and cache.rows.positions[0, 0].tolist() == list(range(5, 50))
    assert cache.token_counts().tolist() == [[50] * 4, [3] * 4]
    q = torch.randn(2, 4, 1, 16)
    s = cache.scores(q, 0.25)
    torch.testing.assert_close(s[..., :3], 0.25 * q @ k[:, :, :3].transpose(-1, -2))  # sink scores are exact


@pytest.mark.parametrize("d", [64, 128])
def test_bytes_floor_two_bits_group_128(d: int) -> None:
    """The floor of issue 10: at 2 bits, groups of 128, B=1, H=8, context 4096: ≤ 0.16 of a float16 cache."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 8, 4096, d, generator=g) for _ in range(2))
    cache = compress(RotateKVPress(), k, v)
    fp16 = KVCache.from_prompt(k.half(), v.half()).nbytes
    per_token = 2 * (8 * d * 2 // 8 + 4 * (8 * d // 128)) + 4  # key and value rows, one position
    held = 5 * 8 * (2 * d * 4 + 4) + 4091 * per_token + 8 * d * 8  # sinks (fp32), rows, channel order (int64)
    assert cache.nbytes == held
    assert cache.nbytes <= 0.16 * fp16


def reference(cache: QuantizedKVCache, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over a plain cache holding the dequantised tokens."""
    keys = torch.cat([cache.sinks.keys, cache.codec.decode_keys(cache.rows.keys)], 2)
    values = torch.cat([cache.sinks.values, hadamard(cache.codec.decode_values_rotated(cache.rows.values))], 2)
    plain = KVCache(keys, values, cache.positions, cache.length)
    return softmax_attention(plain, q, scale)


def test_ragged_decoding_matches_each_sequence_alone() -> None:
    q, k, v = qkv(2, 4, 2, 40, 16, dtype=torch.float32, seed=1)
    lengths = torch.tensor([30, 17])
    press = RotateKVPress(bits=4, group_size=16)
    out, state = az.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], method="softmax", lengths=lengths, press=press)
    alone = [az.prefill(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], method="softmax", press=press)
             for b, n in enumerate(lengths.tolist())]
    exact = az.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], method="softmax", lengths=lengths)[1]
    for t in range(30, 34):
        x = [t_[:, :, t : t + 1] for t_ in (q, k, v)]
        out, state = az.step(state, *x)
        exact_out, exact = az.step(exact, *x)
        assert isinstance(state.data, QuantizedKVCache)
        torch.testing.assert_close(out, reference(state.data, x[0], state.scale))
        for b, (o, s) in enumerate(alone):
            o, s = az.step(s, *(t_[b : b + 1] for t_ in x))
            alone[b] = (o, s)
            torch.testing.assert_close(out[b : b + 1], o)
        assert ((out - exact_out).norm() / exact_out.norm()) < 0.1  # 4 bits: close to the exact output
    assert state.data.rows.slots == 30 - 5 + 4 and state.data.sinks.slots == 5


def test_eight_bits_is_close_and_bytes_grow_with_bits() -> None:
    q, k, v = qkv(1, 4, 4, 64, 32, dtype=torch.float32, seed=2)
    exact, _ = az.prefill(q, k, v, method="softmax")
    sizes = []
    for bits in (2, 4, 8):
        cache = compress(RotateKVPress(bits=bits), k, v)
        sizes.append(cache.nbytes)
        if bits == 8:
            out = softmax_attention(cache, q[:, :, -1:], 32**-0.5)
            torch.testing.assert_close(out, exact[:, :, -1:], atol=2e-2, rtol=2e-2)
    assert sizes[0] < sizes[1] < sizes[2]


def test_scoring_presses_can_follow_by_whole_tokens() -> None:
    """keep(): whole tokens (the same slots for every kv head), sinks first, codes untouched."""
    q, k, v = qkv(2, 4, 2, 24, 16, dtype=torch.float32, seed=4)
    cache = compress(RotateKVPress(n_sink=3, group_size=32), k, v, torch.tensor([24, 10]))
    index = torch.tensor([[15, 1, 20, -1, 0], [-1, 9, 2, 5, 4]]).unsqueeze(1).expand(2, 2, 5)  # slots, not positions
    kept = cache.keep(index)
    # sinks are slots 0-2 (positions 0-2), quantised slot j holds position j: compacted per part, padded with -1
    assert kept.positions[:, 0].tolist() == [[0, 1, 15, 20, -1], [2, -1, 4, 5, 9]]
    assert torch.equal(kept.rows.keys[0, 0, :2], cache.rows.keys[0, 0, [12, 17]])
    torch.testing.assert_close(softmax_attention(kept, q[:, :, -1:], 0.25), reference(kept, q[:, :, -1:], 0.25))


def test_for_budget_picks_bits() -> None:
    assert RotateKVPress.for_budget(0.15).bits == 2
    assert RotateKVPress.for_budget(0.3).bits == 4
    assert RotateKVPress.for_budget(1.0).bits == 8
    assert RotateKVPress.for_budget(0.3, n_sink=0).n_sink == 0
    with pytest.raises(AttnzooError, match="^fraction:"):
        RotateKVPress.for_budget(0.1)


def test_bad_input() -> None:
    with pytest.raises(AttnzooError, match="^bits: expected one of"):
        RotateKVPress(bits=3)
    with pytest.raises(AttnzooError, match="^group_size:"):
        RotateKVPress(group_size=30)
    with pytest.raises(AttnzooError, match="^head_group:"):
        RotateKVPress(head_group=3)
    with pytest.raises(AttnzooError, match="^n_sink:"):
        RotateKVPress(n_sink=-1)
    q, k, v = qkv(1, 2, 2, 8, 12, dtype=torch.float32)
    with pytest.raises(AttnzooError, match="^k: expected a head dimension that is a power of two"):
        az.prefill(q, k, v, method="softmax", press=RotateKVPress())
    q, k, v = qkv(1, 2, 2, 8, 16, dtype=torch.float32)
    cache = compress(RotateKVPress(), k, v)
    with pytest.raises(AttnzooError, match="^index:"):
        cache.keep(torch.tensor([[[0, 1], [0, 2]]]))  # per-head slots
    with pytest.raises(AttnzooError, match="^log_weight:"):
        cache.keep(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3))
    with pytest.raises(AttnzooError, match="^cache: expected a dense KVCache"):
        RotateKVPress().compress(cache, PressContext(q, 1.0, "softmax"))  # type: ignore[arg-type]
    ring = KVCache.from_prompt(k, v, ring=4)
    with pytest.raises(AttnzooError, match="^cache: expected a cache that keeps every token"):
        RotateKVPress().compress(ring, PressContext(q, 1.0, "softmax"))
    per_head = KVCache.from_prompt(k, v).keep(torch.tensor([[[0, 1], [2, 3]]]))
    with pytest.raises(AttnzooError, match="^cache: expected kv heads that hold the same tokens"):
        RotateKVPress().compress(per_head, PressContext(q, 1.0, "softmax"))
