"""K12 MAC-Attention decoding: exact with no match, exact-up-to-rounding on repeated queries, hit counting."""

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kv.mac import mac_prefill, mac_step


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over the whole sequence (the reference decoding must reproduce)."""
    pos = torch.arange(q.shape[2])
    out, _ = softmax_attention_lse(q, k, v, q.shape[-1] ** -0.5, mask=pos[None, :] <= pos[:, None])
    return out


def _decode(q, k, v, prompt: int, **params):
    """Prefill ``prompt`` tokens, then step one token at a time; the whole output and the final state."""
    out, state = mac_prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], **params)
    outs = [out]
    for t in range(prompt, q.shape[2]):
        o, state = mac_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(o)
    return torch.cat(outs, dim=2), state


def _repeating_stream(b=2, h=4, hkv=2, s=64, d=16, period=3, noise=0.0, dtype=torch.float64):
    """Queries cycling through ``period`` patterns (plus optional noise), random keys and values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(b, h, period, d, generator=g, dtype=dtype)
    q = base[:, :, torch.arange(s) % period] + noise * torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    return q, k, v


def test_no_match_equals_plain_decoding():
    q, k, v = _repeating_stream()
    out, state = _decode(q, k, v, prompt=40, threshold=1.5, history=4, band=8)
    assert state.hit_rate == 0.0 and state.lookups == 2 * 4 * 24
    torch.testing.assert_close(out, _exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_exact_repeats_hit_and_reproduce_plain_decoding():
    q, k, v = _repeating_stream()
    out, state = _decode(q, k, v, prompt=40, threshold=0.999, history=4, band=8)
    assert state.hit_rate == 1.0
    torch.testing.assert_close(out, _exact(q, k, v), rtol=1e-10, atol=1e-10)


def test_similar_queries_hit_with_small_error():
    q, k, v = _repeating_stream(noise=0.02, dtype=torch.float32)
    out, state = _decode(q, k, v, prompt=40, threshold=0.9, history=4, band=8)
    assert 0.5 < state.hit_rate <= 1.0
    assert (out - _exact(q, k, v)).abs().max() < 0.1


def test_band_longer_than_cache_and_chunked_steps():
    q, k, v = _repeating_stream(s=20)
    out, state = mac_prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5], threshold=0.999, history=8, band=64)
    rest, state = mac_step(state, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:])
    torch.testing.assert_close(torch.cat([out, rest], dim=2), _exact(q, k, v), rtol=1e-12, atol=1e-12)
    assert state.length == 20


@pytest.mark.parametrize(("name", "params"), [("history", {"history": 0}), ("band", {"band": -1}),
                                              ("threshold", {"threshold": "high"})])
def test_bad_parameters_name_the_argument(name, params):
    q, k, v = _repeating_stream(s=8)
    with pytest.raises(AttnzooError, match=name):
        mac_prefill(q, k, v, **params)


def test_step_with_other_heads_fails():
    q, k, v = _repeating_stream(s=8)
    _, state = mac_prefill(q, k, v)
    with pytest.raises(AttnzooError, match="q"):
        mac_step(state, q[:, :2, :1], k[:, :, :1], v[:, :, :1])


def test_rows_that_miss_are_exact_while_others_hit():
    q, k, v = _repeating_stream()
    q[:, 1::2] = torch.randn(q[:, 1::2].shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    out, state = _decode(q, k, v, prompt=40, threshold=0.999, history=4, band=8)
    assert state.hit_rate == pytest.approx(0.5)
    torch.testing.assert_close(out, _exact(q, k, v), rtol=1e-10, atol=1e-10)


def test_cache_grows_past_its_first_capacity():
    q, k, v = _repeating_stream(b=1, h=1, hkv=1, s=1040, d=4)
    out, state = mac_prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], threshold=1.5, history=2, band=4)
    capacity = state.k.shape[2]
    rest, state = mac_step(state, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:])
    assert state.k.shape[2] > capacity and state.length == 1040
    torch.testing.assert_close(torch.cat([out, rest], dim=2), _exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_l2_rule_of_the_public_kernels_hits_repeats_and_threshold_one_never_matches():
    q, k, v = _repeating_stream()
    out, state = _decode(q, k, v, prompt=40, threshold=0.45, history=4, band=8, match="l2")
    assert state.hit_rate == 1.0  # exact repeats: distance 0 < 2·D·(1 − 0.45)²
    torch.testing.assert_close(out, _exact(q, k, v), rtol=1e-10, atol=1e-10)
    out, state = _decode(q, k, v, prompt=40, threshold=1.0, history=4, band=8, match="l2")
    assert state.hit_rate == 0.0
    torch.testing.assert_close(out, _exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_matching_reads_match_q_not_the_attended_query():
    """Rotated (attended) queries never repeat, their pre-rotation ones do: matching ``match_q`` finds the repeats."""
    q, k, v = _repeating_stream(s=48)
    g = torch.Generator().manual_seed(3)
    attended = q + 0.5 * torch.randn(q.shape, generator=g, dtype=q.dtype)
    _, state = mac_prefill(attended[:, :, :40], k[:, :, :40], v[:, :, :40], threshold=0.999, history=4, band=8,
                             match_q=q[:, :, :40])
    for t in range(40, 48):
        _, state = mac_step(state, attended[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                            match_q=q[:, :, t:t + 1])
    assert state.hit_rate == 1.0
    _, plain = _decode(attended, k, v, prompt=40, threshold=0.999, history=4, band=8)
    assert plain.hit_rate < 0.2


@pytest.mark.parametrize(("name", "params"), [("match", {"match": "dot"}),
                                              ("match_q", {"match_q": torch.zeros(1, 1, 1, 1)})])
def test_bad_matching_arguments_name_the_argument(name, params):
    q, k, v = _repeating_stream(s=8)
    with pytest.raises(AttnzooError, match=rf"^{name}:"):
        mac_prefill(q, k, v, **params)
