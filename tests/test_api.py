"""The contract of ``attnzoo.attention``: shapes, GQA, cross, masks, and one clear error per kind of bad input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import Press, PressContext


def qkv(b=2, h=4, hkv=2, sq=9, skv=9, d=8, dv=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, sq, d, generator=g, dtype=dtype), torch.randn(b, hkv, skv, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, skv, dv, generator=g, dtype=dtype))


def test_softmax_matches_sdpa_with_gqa_and_value_dim():
    q, k, v = qkv(dv=5)
    out = az.attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert out.shape == (2, 4, 9, 5)
    torch.testing.assert_close(out, want)


def test_causal_cross_is_bottom_right_aligned():
    q, k, v = qkv(sq=3, skv=7, dtype=torch.float64)
    out = az.attention(q, k, v, causal=True)
    for i in range(3):  # query i sees keys 0 .. i + 4
        row = az.attention(q[:, :, i : i + 1], k[:, :, : i + 5], v[:, :, : i + 5])
        torch.testing.assert_close(out[:, :, i : i + 1], row)


def test_mask_and_bias_broadcast():
    q, k, v = qkv(dtype=torch.float64)
    mask = torch.rand(9, 9) < 0.5
    mask[:, 0] = True
    bias = torch.randn(1, 4, 1, 9, dtype=torch.float64)
    out = az.attention(q, k, v, mask=mask, bias=bias)
    ref = az.attention(q, k, v, mask=mask, bias=bias, backend="reference")
    torch.testing.assert_close(out, ref)


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = qkv()
    q.requires_grad_(True)
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[3] = False
    out = az.attention(q, k, v, mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda q, k, v: (q[0], k, v), "q"),
        (lambda q, k, v: (q, k[:1], v), "k"),
        (lambda q, k, v: (q, k, v[:1]), "v"),
        (lambda q, k, v: (q, k[..., :4], v), "k"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "v"),
        (lambda q, k, v: (q, torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)), "k"),
        (lambda q, k, v: (q, k.double(), v), "k"),
        (lambda q, k, v: (q, k, v.to(torch.int64)), "v"),
        (lambda q, k, v: (q, k.to("meta"), v), "k"),
        (lambda q, k, v: (q, k, "v"), "v"),
        (lambda q, k, v: (q[:, :, :0], k, v), "q"),
    ],
)
def test_bad_tensors_name_the_argument(change, argument):
    q, k, v = change(*qkv())
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        az.attention(q, k, v)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"method": "sigmod"}, "method"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"causal": 1}, "causal"),
        ({"mask": torch.ones(9, 9)}, "mask"),
        ({"mask": torch.ones(3, 9, 9, dtype=torch.bool)}, "mask"),
        ({"bias": torch.ones(9, 9, dtype=torch.float64)}, "bias"),
        ({"bias": torch.ones(9, 8)}, "bias"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"backend": "torch"}, "backend"),
        ({"method": "sigmoid", "sigmoid_bias": "x"}, "sigmoid_bias"),
        ({"method": "sigmoid", "sigmoid_bais": -1.0}, "sigmoid_bais"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(AttnzooError, match=rf"^{argument}:") as info:
        az.attention(*qkv(), **kwargs)
    assert isinstance(info.value, ValueError)


def test_unknown_method_suggests_close_names():
    with pytest.raises(AttnzooError, match="did you mean 'sigmoid'"):
        az.attention(*qkv(), method="sigmod")


def test_misspelt_parameter_suggests_the_right_one():
    with pytest.raises(AttnzooError, match="did you mean 'sigmoid_bias'"):
        az.attention(*qkv(), method="sigmoid", sigmoid_bais=-1.0)


def test_explicit_reference_backend():
    q, k, v = qkv(dtype=torch.float64)
    torch.testing.assert_close(az.attention(q, k, v, backend="reference"), az.attention(q, k, v, backend="sdpa"))


def test_auto_prefers_torch_over_flex_on_cpu():
    from attnzoo.api import prepare, select_backend

    for m in az.get("score_mod"), az.get("sliding_window"):
        q, k, v = qkv()
        call = prepare(m, q, k, v, False, None, None, None, {})[0]
        assert select_backend(m, call, "auto").name == "torch"


def test_backend_names_only_the_methods_own_backends():
    with pytest.raises(AttnzooError, match=r"^backend: expected 'auto' or one of \['sdpa', 'reference'\]"):
        az.attention(*qkv(), backend="flex")


def _decode_inputs(n=12, dtype=torch.float64):
    return qkv(sq=n, skv=n, dtype=dtype)


def test_prefill_then_step_continues_the_causal_forward():
    q, k, v = _decode_inputs()
    full = az.attention(q, k, v, method="lightning", causal=True, decay=0.2)
    out, state = az.prefill(q[:, :, :7], k[:, :, :7], v[:, :, :7], method="lightning", decay=0.2)
    assert isinstance(state, az.DecodeState) and (state.method, state.length) == ("lightning", 7)
    assert state.params["decay"] == 0.2 and state.params["block_size"] == 128  # resolved: defaults included
    one, state = az.step(state, q[:, :, 7:8], k[:, :, 7:8], v[:, :, 7:8])  # the method comes from the state
    rest, state = az.step(state, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:])  # a chunk of 4 tokens
    assert state.length == 12
    torch.testing.assert_close(torch.cat([out, one, rest], dim=2), full)


def test_step_takes_this_steps_per_token_parameters():
    q, k, v = _decode_inputs()
    g = torch.Generator().manual_seed(1)
    log_gate = -torch.rand(2, 4, 12, generator=g, dtype=torch.float64)
    full = az.attention(q, k, v, method="gated_delta", causal=True, log_gate=log_gate, beta=0.5)
    out, state = az.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5], method="gated_delta", log_gate=log_gate[..., :5],
                            beta=0.5)
    assert state.token_params == ("log_gate",)  # a float beta is the same for every token: kept in the state
    with pytest.raises(AttnzooError, match=r"^log_gate:"):
        az.step(state, q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6])
    rest, _ = az.step(state, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], log_gate=log_gate[..., 5:])
    torch.testing.assert_close(torch.cat([out, rest], dim=2), full)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda q, k, v: az.prefill(q, k, v, method="rala"), "method"),  # does not decode
        (lambda q, k, v: az.prefill(q, k, v, method="lightning", decay=-1.0), "decay"),
        (lambda q, k, v: az.prefill(q, k[:, :, :5], v[:, :, :5], method="lightning"), "causal"),  # cross
        (lambda q, k, v: az.step("state", q, k, v), "state"),
        (lambda q, k, v: az.step(_state(q, k, v), q[:1, :, :1], k[:1, :, :1], v[:1, :, :1]), "q"),
        (lambda q, k, v: az.step(_state(q, k, v), *(x[:, :, :1].float() for x in (q, k, v))), "q"),
        (lambda q, k, v: az.step(_state(q, k, v), q[:, :, :1], k[:, :, :1], v[:, :, :1], decay=0.5), "decay"),
        (lambda q, k, v: az.step(_state(q, k, v), q[:, :, :1], k[:, :, :1], v[:, :, :1], scale=0.5), "scale"),
        (lambda q, k, v: az.step(_state(q, k, v), q[:, :, :1], k[:, :, :1], v[:, :, :1], decai=0.5), "decai"),
        (lambda q, k, v: az.prefill(q, k, v, method="softmax", lengths=torch.tensor([12, 13])), "lengths"),
        (lambda q, k, v: az.prefill(q, k, v, method="softmax", lengths=torch.tensor([1.0, 2.0])), "lengths"),
        (lambda q, k, v: az.prefill(q, k, v, method="softmax", lengths=torch.tensor([3])), "lengths"),
        (lambda q, k, v: az.prefill(q, k, v, method="softmax", press="snapkv"), "press"),
        (lambda q, k, v: az.prefill(q, k, v, method="lightning", press=_KeepFirst()), "press"),  # no KV cache
    ],
)
def test_bad_decoding_calls_name_the_argument(call, argument):
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        call(*_decode_inputs())


@dataclass(frozen=True)
class _KeepFirst(Press):
    """A press for the API tests: keeps each row's first two slots."""

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        return cache.keep(torch.arange(2).expand(*cache.positions.shape[:2], 2))


def test_a_press_transforms_the_cache_after_the_whole_prompt():
    q, k, v = _decode_inputs()
    full = az.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], method="softmax", causal=True)
    out, state = az.prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], method="softmax", press=_KeepFirst())
    torch.testing.assert_close(out, full)  # the prompt is attended in full
    assert state.data.slots == 2 and state.press == _KeepFirst()
    one, state = az.step(state, q[:, :, 8:9], k[:, :, 8:9], v[:, :, 8:9])
    idx = [0, 1, 8]  # the step sees the kept tokens and itself
    want = az.attention(q[:, :, 8:9], k[:, :, idx], v[:, :, idx], method="softmax", causal=True)
    torch.testing.assert_close(one, want)
    assert state.data.positions[0, 0].tolist() == [0, 1, 8]


@pytest.mark.parametrize("method", ["softmax", "lightning"])
def test_ragged_prompts_continue_each_sequence_from_its_own_length(method):
    q, k, v = _decode_inputs()
    lengths = torch.tensor([8, 5])
    out, state = az.prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], method=method, lengths=lengths)
    assert out[1, :, 5:].abs().max() == 0  # padding gives zeros
    nxt, _ = az.step(state, q[:, :, 8:10], k[:, :, 8:10], v[:, :, 8:10])
    for b, n in enumerate(lengths.tolist()):
        idx = [*range(n), 8, 9]  # the sequence's own tokens, then the two new ones at positions n, n + 1
        want = az.attention(*(x[b : b + 1, :, idx] for x in (q, k, v)), method=method, causal=True)
        torch.testing.assert_close(out[b : b + 1, :, :n], want[:, :, :n])
        torch.testing.assert_close(nxt[b : b + 1], want[:, :, n:])


def _state(q, k, v):
    return az.prefill(q, k, v, method="lightning", decay=0.2)[1]


def test_step_suggests_a_misspelt_parameter():
    q, k, v = _decode_inputs()
    with pytest.raises(AttnzooError, match="did you mean 'decay'"):
        az.step(_state(q, k, v), q[:, :, :1], k[:, :, :1], v[:, :, :1], decai=0.5)


def test_return_lse_gives_the_rows_log_sum_exp_and_the_same_output():
    q, k, v = qkv(sq=5, skv=9, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[:, :, 0] = False
    out, lse = az.attention(q, k, v, causal=True, mask=mask, return_lse=True)
    torch.testing.assert_close(out, az.attention(q, k, v, causal=True, mask=mask))
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 8**0.5
    seen = mask & (torch.arange(9) <= torch.arange(5).view(-1, 1) + 4)
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~seen, float("-inf")), dim=-1))
    assert torch.isneginf(lse[:, :, 0]).all() and (out[:, :, 0] == 0).all()


@pytest.mark.parametrize(("kwargs", "argument"), [({"return_lse": "yes"}, "return_lse"),
                                                  ({"return_lse": True, "method": "sigmoid"}, "return_lse"),
                                                  ({"return_lse": True, "method": "linear"}, "return_lse")])
def test_return_lse_on_a_method_without_one_names_it(kwargs, argument):
    with pytest.raises(AttnzooError, match=rf"^{argument}:"):
        az.attention(*qkv(), **kwargs)
