"""K13 APE: the encoder equals causal attention over each ``[prefix; context]``; the query attention's fast path
equals the dense definition (fp64 and fp32, GQA, ragged contexts, chunks, gradients); ``T = S = 1`` is plain softmax
(one context: causal attention over ``[prefix; context; query]``); decoding equals the reference over the whole at
every step; positions are reused across contexts; bad input names its argument."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.kv import ape_attention, ape_encode, ape_positions, ape_prefill, ape_reference, ape_step

LENGTHS = (3, 7, 4)


def _request(b=2, h=4, hkv=2, p=5, lengths=LENGTHS, sq=3, d=8, dv=8, dtype=torch.float64, prefix_batch=1,
             seed=0, grad=False):
    """A random request: prefix K/V, per-context q/k/v, the query's own q/k/v."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    return {
        "prefix_k": r(prefix_batch, hkv, p, d), "prefix_v": r(prefix_batch, hkv, p, dv),
        "contexts_q": [r(b, h, n, d) for n in lengths], "contexts_k": [r(b, hkv, n, d) for n in lengths],
        "contexts_v": [r(b, hkv, n, dv) for n in lengths],
        "q": r(b, h, sq, d), "k": r(b, hkv, sq, d), "v": r(b, hkv, sq, dv),
    }


def _parts(x):
    """Positional arguments of ape_attention / ape_reference for request ``x``."""
    return (x["q"], x["prefix_k"], x["prefix_v"], torch.cat(x["contexts_k"], 2), torch.cat(x["contexts_v"], 2),
            x["k"], x["v"])


def _causal_sdpa(q, k, v):
    """Dense causal attention of the last ``Sq`` positions over ``k``/``v`` (bottom-right aligned)."""
    sq, n = q.shape[2], k.shape[2]
    mask = torch.ones(sq, n, dtype=torch.bool).tril(n - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("h", "hkv", "prefix_batch"), [(4, 4, 2), (4, 2, 1), (6, 2, 2)])
@pytest.mark.parametrize("dv", [8, 6])
def test_encoding_equals_causal_attention_over_prefix_and_each_context(dtype, h, hkv, prefix_batch, dv):
    x = _request(h=h, hkv=hkv, dtype=dtype, prefix_batch=prefix_batch, dv=dv)
    outs = ape_encode(x["prefix_k"], x["prefix_v"], x["contexts_q"], x["contexts_k"], x["contexts_v"])
    prefix_k, prefix_v = x["prefix_k"].expand(2, -1, -1, -1), x["prefix_v"].expand(2, -1, -1, -1)
    for q, k, v, out in zip(x["contexts_q"], x["contexts_k"], x["contexts_v"], outs, strict=True):
        want = _causal_sdpa(q, torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2))
        torch.testing.assert_close(out, want)


def test_encoding_gradients_match_dense_attention():
    x = _request(grad=True)
    outs = ape_encode(x["prefix_k"], x["prefix_v"], x["contexts_q"], x["contexts_k"], x["contexts_v"])
    wants = [_causal_sdpa(q, torch.cat([x["prefix_k"].expand(2, -1, -1, -1), k], 2),
                          torch.cat([x["prefix_v"].expand(2, -1, -1, -1), v], 2))
             for q, k, v in zip(x["contexts_q"], x["contexts_k"], x["contexts_v"], strict=True)]
    leaves = [x["prefix_k"], x["prefix_v"], *x["contexts_q"], *x["contexts_k"], *x["contexts_v"]]
    probes = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    got = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes, strict=True)), leaves)
    want = torch.autograd.grad(sum((o * p).sum() for o, p in zip(wants, probes, strict=True)), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("h", "hkv", "prefix_batch"), [(4, 4, 2), (4, 2, 1), (6, 3, 2)])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize(("temperature", "scaling", "dv"), [(0.9, 0.9, 8), (0.5, 1.3, 8), (1.7, 0.4, 6)])
def test_fast_path_equals_the_dense_definition(dtype, h, hkv, prefix_batch, sq, temperature, scaling, dv):
    args = _parts(_request(h=h, hkv=hkv, sq=sq, dtype=dtype, prefix_batch=prefix_batch, dv=dv))
    out = ape_attention(*args, temperature=temperature, scaling=scaling)
    torch.testing.assert_close(out, ape_reference(*args, temperature=temperature, scaling=scaling))


def test_lse_is_the_normaliser_of_the_definition():
    """``exp(lse)`` = mass of the plain part + (context mass at temperature T) ** (S·T), from the logits directly."""
    x = _request(h=2, hkv=2, prefix_batch=2)
    q, pk, pv, ck, cv, k, v = _parts(x)
    temperature, scaling = 0.6, 0.8
    _, lse = ape_attention(q, pk, pv, ck, cv, k, v, temperature=temperature, scaling=scaling, return_lse=True)
    scale = q.shape[-1] ** -0.5
    other = torch.cat([scale * q @ pk.transpose(-1, -2),
                       (scale * q @ k.transpose(-1, -2)).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(),
                                                                     float("-inf"))], -1)
    context_mass = torch.exp(scale * q @ ck.transpose(-1, -2) / temperature).sum(-1)
    want = torch.log(torch.exp(other).sum(-1) + context_mass ** (scaling * temperature))
    torch.testing.assert_close(lse, want)


def test_fast_path_gradients_match_the_dense_definition():
    args = _parts(_request(sq=2, grad=True))
    out = ape_attention(*args, temperature=0.7, scaling=0.8)
    want = ape_reference(*args, temperature=0.7, scaling=0.8)
    probe = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out * probe).sum(), args)
    refs = torch.autograd.grad((want * probe).sum(), args)
    for a, b in zip(got, refs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sq", [1, 4])
def test_unit_temperature_and_scaling_with_one_context_is_causal_attention(sq):
    x = _request(lengths=(6,), sq=sq, h=4, hkv=2)
    out = ape_attention(*_parts(x), temperature=1.0, scaling=1.0)
    prefix_k, prefix_v = x["prefix_k"].expand(2, -1, -1, -1), x["prefix_v"].expand(2, -1, -1, -1)
    keys = torch.cat([prefix_k, x["contexts_k"][0], x["k"]], 2)
    values = torch.cat([prefix_v, x["contexts_v"][0], x["v"]], 2)
    torch.testing.assert_close(out, _causal_sdpa(x["q"], keys, values))


def test_unit_temperature_and_scaling_is_softmax_over_every_key():
    """Several contexts: each query sees the prefix, every context token, and its own tokens causally."""
    x = _request(sq=3)
    q, pk, pv, ck, cv, k, v = _parts(x)
    keys = torch.cat([pk.expand(2, -1, -1, -1), ck, k], 2)
    values = torch.cat([pv.expand(2, -1, -1, -1), cv, v], 2)
    out = ape_attention(q, pk, pv, ck, cv, k, v, temperature=1.0, scaling=1.0)
    torch.testing.assert_close(out, _causal_sdpa(q, keys, values))


def test_an_empty_prefix_is_plain_parallel_encoding():
    x = _request(p=0, prefix_batch=2)
    outs = ape_encode(x["prefix_k"], x["prefix_v"], x["contexts_q"], x["contexts_k"], x["contexts_v"])
    for q, k, v, out in zip(x["contexts_q"], x["contexts_k"], x["contexts_v"], outs, strict=True):
        torch.testing.assert_close(out, _causal_sdpa(q, k, v))
    args = _parts(x)
    torch.testing.assert_close(ape_attention(*args), ape_reference(*args))


def test_temperature_sharpens_the_contexts_and_scaling_shrinks_their_share():
    """On one context token against one plain key, the weights follow the definition's closed form."""
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    prefix_k, prefix_v = torch.zeros(1, 1, 0, 1, dtype=torch.float64), torch.zeros(1, 1, 0, 1, dtype=torch.float64)
    context_k = torch.tensor([[[[2.0], [0.0]]]], dtype=torch.float64)  # logits 2 and 0 at scale 1
    context_v = torch.tensor([[[[1.0], [0.0]]]], dtype=torch.float64)
    own_k, own_v = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1), -1.0, dtype=torch.float64)
    t, s = 0.5, 0.8
    out = ape_attention(q, prefix_k, prefix_v, context_k, context_v, own_k, own_v, temperature=t, scaling=s,
                        scale=1.0)
    z_context = torch.tensor(4.0, dtype=torch.float64).exp() + 1  # exp(2 / T) + exp(0 / T)
    share = z_context ** (s * t) / (z_context ** (s * t) + 1)  # own key: logit 0, mass 1
    want = share * torch.tensor(4.0, dtype=torch.float64).exp() / z_context - (1 - share)
    torch.testing.assert_close(out.reshape(()), want)


@pytest.mark.parametrize(("h", "hkv", "prefix_batch"), [(4, 2, 1), (4, 4, 2)])
def test_decoding_equals_the_reference_over_the_whole(h, hkv, prefix_batch):
    x = _request(h=h, hkv=hkv, prefix_batch=prefix_batch, seed=3)
    kw = {"temperature": 0.8, "scaling": 0.7}
    out, state = ape_prefill(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["contexts_k"],
                             x["contexts_v"], **kw)
    torch.testing.assert_close(out, ape_reference(*_parts(x), **kw))
    g = torch.Generator().manual_seed(4)
    own_k, own_v = [x["k"]], [x["v"]]
    for tokens in (1, 1, 2, 1):
        q = torch.randn(2, h, tokens, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(2, hkv, tokens, 8, generator=g, dtype=torch.float64) for _ in range(2))
        own_k.append(k)
        own_v.append(v)
        out, state = ape_step(state, q, k, v)
        want = ape_reference(q, x["prefix_k"], x["prefix_v"], torch.cat(x["contexts_k"], 2),
                             torch.cat(x["contexts_v"], 2), torch.cat(own_k, 2), torch.cat(own_v, 2), **kw)
        torch.testing.assert_close(out, want)
    assert state.prefix_k is x["prefix_k"]  # the prefix is held once, never copied per step
    assert int(state.own.length[0]) == 3 + 5


def test_an_older_state_still_decodes_its_own_branch():
    x = _request(sq=1)
    _, state = ape_prefill(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["contexts_k"], x["contexts_v"])
    q, k, v = x["q"], x["k"] + 1, x["v"] - 1
    first, _ = ape_step(state, q, k, v)
    ape_step(state, q, k * 3, v * 3)  # another continuation of the same state
    again, _ = ape_step(state, q, k, v)
    torch.testing.assert_close(again, first)


def test_positions_are_reused_across_contexts():
    positions, query_start = ape_positions(4, [3, 5, 2])
    assert [p.tolist() for p in positions] == [[4, 5, 6], [4, 5, 6, 7, 8], [4, 5]]
    assert query_start == 9


def test_reachable_from_the_package():
    assert az.kv.ape_attention is ape_attention


@pytest.mark.parametrize(("name", "change"), [
    ("contexts_k", lambda x: {"contexts_k": [], "contexts_v": []}),
    ("contexts_v", lambda x: {"contexts_v": x["contexts_v"][:2]}),
    ("contexts_k[1]", lambda x: {"contexts_k": [x["contexts_k"][0], x["contexts_k"][1][:, :1],
                                                x["contexts_k"][2]]}),
    ("contexts_k[2]", lambda x: {"contexts_k": [*x["contexts_k"][:2], x["contexts_k"][2][:1]]}),
    ("contexts_v[0]", lambda x: {"contexts_v": [x["contexts_v"][0][..., :2], *x["contexts_v"][1:]]}),
    ("contexts_k[0]", lambda x: {"contexts_k": [x["contexts_k"][0][:, :, :0], *x["contexts_k"][1:]],
                                 "contexts_v": [x["contexts_v"][0][:, :, :0], *x["contexts_v"][1:]]}),
    ("prefix_v", lambda x: {"prefix_v": x["prefix_v"][:, :, :2]}),
    ("prefix_k", lambda x: {"prefix_k": torch.randn(3, 2, 5, 8, dtype=torch.float64),
                            "prefix_v": torch.randn(3, 2, 5, 8, dtype=torch.float64)}),  # batch 3, contexts 2
])
def test_bad_contexts_name_their_argument(name, change):
    x = _request()
    x = {**x, **change(x)}
    with pytest.raises(az.AttnzooError, match=f"^{re.escape(name)}: "):
        ape_prefill(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["contexts_k"], x["contexts_v"])
    with pytest.raises(az.AttnzooError, match=f"^{re.escape(name)}: "):
        ape_encode(x["prefix_k"], x["prefix_v"], x["contexts_q"], x["contexts_k"], x["contexts_v"])


def test_bad_context_queries_name_their_argument():
    x = _request()
    bad = [x["contexts_q"][0], x["contexts_q"][1][:, :, :2], x["contexts_q"][2]]
    with pytest.raises(az.AttnzooError, match=r"^contexts_q\[1\]: "):
        ape_encode(x["prefix_k"], x["prefix_v"], bad, x["contexts_k"], x["contexts_v"])
    with pytest.raises(az.AttnzooError, match=r"^contexts_q: "):
        ape_encode(x["prefix_k"], x["prefix_v"], x["contexts_q"][:1], x["contexts_k"], x["contexts_v"])
    odd_heads = [torch.randn(2, 3, n, 8, dtype=torch.float64) for n in LENGTHS]
    with pytest.raises(az.AttnzooError, match=r"^contexts_q\[0\]: "):
        ape_encode(x["prefix_k"], x["prefix_v"], odd_heads, x["contexts_k"], x["contexts_v"])


@pytest.mark.parametrize(("name", "value"), [
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", True),
    ("scaling", 0), ("scaling", float("inf")), ("scaling", torch.tensor(0.5)), ("scale", -0.1),
])
def test_bad_factors_name_their_argument(name, value):
    args = _parts(_request())
    with pytest.raises(az.AttnzooError, match=rf"^{name}: expected a positive finite number"):
        ape_attention(*args, **{name: value})
    with pytest.raises(az.AttnzooError, match=rf"^{name}: "):
        ape_reference(*args, **{name: value})


@pytest.mark.parametrize(("index", "name", "bad"), [
    (0, "prefix_k", torch.randn(2, 3, 1, 8, dtype=torch.float64)),  # 2 kv heads do not divide 3 query heads
    (0, "q", torch.randn(2, 4, 8, dtype=torch.float64)),
    (3, "context_k", torch.randn(1, 2, 14, 8, dtype=torch.float64)),  # batch 1 where q has 2
    (4, "context_v", torch.randn(2, 2, 13, 8, dtype=torch.float64)),
    (5, "own_k", torch.randn(2, 2, 3, 7, dtype=torch.float64)),
    (6, "own_v", torch.randn(2, 2, 3, 5, dtype=torch.float64)),
    (1, "prefix_k", torch.randn(1, 2, 5, 7, dtype=torch.float64)),
])
def test_bad_attention_arguments_name_their_argument(index, name, bad):
    args = list(_parts(_request()))
    args[index] = bad
    with pytest.raises(az.AttnzooError, match=rf"^{name}: "):
        ape_attention(*args)


def test_bad_steps_name_their_argument():
    x = _request()
    _, state = ape_prefill(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["contexts_k"], x["contexts_v"])
    q, k, v = x["q"][:, :, :1], x["k"][:, :, :1], x["v"][:, :, :1]
    with pytest.raises(az.AttnzooError, match=r"^state: "):
        ape_step(None, q, k, v)
    with pytest.raises(az.AttnzooError, match=r"^q: "):
        ape_step(state, q[..., :4], k, v)
    with pytest.raises(az.AttnzooError, match=r"^k: "):
        ape_step(state, q, x["k"], v)
    with pytest.raises(az.AttnzooError, match=r"^v: "):
        ape_step(state, q, k, v[..., :2])
    with pytest.raises(az.AttnzooError, match=r"^k: "):
        ape_prefill(x["q"], k, v, x["prefix_k"], x["prefix_v"], x["contexts_k"], x["contexts_v"])


@pytest.mark.parametrize(("args", "name"), [((-1, [2]), "prefix_length"), ((3, []), "context_lengths"),
                                            ((3, [2, 0]), "context_lengths")])
def test_bad_positions_name_their_argument(args, name):
    with pytest.raises(az.AttnzooError, match=rf"^{name}: "):
        ape_positions(*args)
