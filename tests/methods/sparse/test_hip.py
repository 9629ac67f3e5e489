"""D7 hip: the vectorised tree search against a plain per-row search, planted keys found, sink and window always
chosen, no future block, selection shape, full budget = full attention, determinism, the fast path against the
reference (fp64, GQA, cross, forward and backward), decoding, at_density and bad parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.hip import SPEC, select
from attnzoo.registry import Call
from tests.helpers import F64, assert_decodes, assert_matches_reference, qkv

PARAMS = {"block_q": 4, "block_k": 2, "top_k": 3, "sink": 2, "window": 4, "representative": "first"}


def _search_one_row(q_block: torch.Tensor, keys: torch.Tensor, lo: int, hi: int, limit: int, top_k: int,
                    block_k: int, representative: str) -> set[int]:
    """HiP's search for one query block, branch by branch (the module docstring's rule, written plainly)."""
    span = hi - lo
    branches = [(lo + span * i // top_k, lo + span * (i + 1) // top_k) for i in range(top_k)]
    branches = [(a, e) for a, e in branches if e > a]
    while any(e - a > 1 for a, e in branches):
        children = []
        for a, e in branches:
            mid = a + (e - a) // 2
            children += [(c, f) for c, f in ((a, mid), (mid, e)) if f > c]
        scored = []
        for a, e in children:
            first = a * block_k
            rep = first if representative == "first" else first + max(1, min(e * block_k, limit) - first) // 2
            scored.append((float((q_block.float() @ keys[rep].float()).max()), (a, e)))
        scored.sort(key=lambda t: -t[0])
        branches = [c for _, c in scored[:top_k]]
    return {a for a, _ in branches}


@pytest.mark.parametrize("representative", ["first", "center"])
@pytest.mark.parametrize("causal", [False, True])
def test_tree_search_equals_a_plain_per_row_search(causal, representative):
    q, k, _ = qkv(1, 2, 1, 61, seed=11)
    params = {**PARAMS, "top_k": 3, "window": 4 if causal else 0, "representative": representative}
    sel = select(q, k, causal=causal, **params)
    bq, bk = params["block_q"], params["block_k"]
    nk = -(-61 // bk)
    sink_b, win_b = -(-params["sink"] // bk), (-(-params["window"] // bk) if causal else 0)
    for h in range(2):
        for a in range(sel.num_q_blocks):
            last = min((a + 1) * bq, 61) - 1
            seen = min(nk, last // bk + 1) if causal else nk
            limit = last + 1 if causal else 61
            lo, hi = min(sink_b, seen), max(min(sink_b, seen), seen - win_b)
            rows = q[0, h, a * bq : min((a + 1) * bq, 61)]
            want = _search_one_row(rows, k[0, 0], lo, hi, limit, params["top_k"], bk, representative)
            want |= set(range(lo)) | set(range(hi, seen))
            got = {int(i) for i in sel.indices[0, h, a] if i >= 0}
            assert got == want, (h, a)


@pytest.mark.parametrize("representative", ["first", "center"])
@pytest.mark.parametrize("top_k", [2, 3])
def test_finds_a_planted_peak(top_k, representative):
    # one head, keys of small noise plus a smooth bump peaking at key 80 (block 40) along the query's direction: the
    # attention locality HiP relies on, so halving branches by their representatives walks to the peak
    g = torch.Generator().manual_seed(0)
    k = 0.01 * torch.randn(1, 1, 128, 8, generator=g, dtype=F64)
    q = 0.01 * torch.randn(1, 1, 16, 8, generator=g, dtype=F64)
    q[..., 0] += 1.0
    k[0, 0, :, 0] += (5 - (torch.arange(128, dtype=F64) - 80).abs() / 8).clamp(min=0)
    sel = select(q, k, causal=False, block_q=16, block_k=2, top_k=top_k, sink=0, window=0,
                 representative=representative)
    chosen = {int(i) for i in sel.indices[0, 0, 0]}
    assert 40 in chosen and all(37 <= i <= 43 for i in chosen)


def test_sink_and_window_always_chosen_and_no_future_block():
    q, k, _ = qkv(2, 4, 2, 50, seed=3)
    sel = select(q, k, causal=True, **PARAMS)
    idx = sel.indices
    assert idx.shape == (2, 4, 13, 3 + 1 + 2)  # top_k + sink blocks + window blocks
    last = (torch.arange(13) * 4 + 3).clamp(max=49)
    frontier = (last // 2).view(1, 1, -1, 1)
    assert bool(((idx <= frontier) | (idx == -1)).all())
    chosen = sel.blocks()
    assert bool(chosen[..., 0].all())  # the sink block
    for a in range(13):
        f = int(frontier[0, 0, a, 0])
        assert bool(chosen[:, :, a, max(0, f - 1) : f + 1].all())  # the window: the last two visible blocks
    # ascending, unused slots last, no block twice
    used = idx >= 0
    assert bool((used[..., 1:] <= used[..., :-1]).all())
    assert bool(((idx[..., 1:] > idx[..., :-1]) | ~used[..., 1:]).all())


@pytest.mark.parametrize("causal", [False, True])
def test_budget_covering_every_block_is_full_attention(causal):
    q, k, v = qkv(2, 4, 2, 23, seed=2)
    out = az.attention(q, k, v, method="hip", causal=causal, backend="torch", block_q=4, block_k=3, top_k=8, sink=0,
                       window=0)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_causal_no_output_depends_on_a_later_token():
    q, k, v = qkv(1, 2, 1, 30, seed=4, requires_grad=True)
    out = az.attention(q, k, v, method="hip", causal=True, backend="torch", **PARAMS)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 40, seed=5, dtype=torch.float32)
    a = az.attention(q, k, v, method="hip", causal=True, backend="torch", **PARAMS)
    b = az.attention(q, k, v, method="hip", causal=True, backend="torch", **PARAMS)
    assert torch.equal(a, b)
    assert torch.equal(select(q, k, causal=True, **PARAMS).indices, select(q, k, causal=True, **PARAMS).indices)


@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "causal", "params"), [
    (2, 4, 2, 37, 37, True, PARAMS),
    (1, 2, 2, 16, 16, False, {**PARAMS, "representative": "center"}),
    (2, 6, 3, 9, 50, True, {"block_q": 3, "block_k": 4, "top_k": 2, "sink": 0, "window": 5}),
    (1, 2, 1, 50, 9, False, {"block_q": 5, "block_k": 1, "top_k": 4, "sink": 1, "window": 0}),
])
def test_torch_matches_reference(b, h, hkv, sq, skv, causal, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=6, requires_grad=True)
    assert_matches_reference("hip", q, k, v, causal=causal, **params)


def test_decoding_ragged_prompts_equals_the_causal_forward():
    q, k, v = qkv(3, 4, 2, 26, seed=7)
    assert_decodes("hip", q, k, v, [5, 11, 8], **{**PARAMS, "block_q": 1})


def test_decoding_a_chunk_equals_the_causal_forward():
    q, k, v = qkv(2, 2, 1, 24, seed=8)
    params = {**PARAMS, "block_q": 1, "representative": "center"}
    want = az.attention(q, k, v, method="hip", causal=True, backend="reference", **params)
    out, state = az.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], method="hip", **params)
    out, state = az.step(state, q[:, :, 10:24], k[:, :, 10:24], v[:, :, 10:24])
    torch.testing.assert_close(out, want[:, :, 10:24])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_at_density_reads_about_the_fraction(causal, fraction):
    call = Call(1, 2, 2, 1024, 1024, 16, 16, causal=causal, device=torch.device("cpu"), dtype=torch.float32,
                requires_grad=False, has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    for p in SPEC.params:
        p.validate(params.get(p.name, p.default), call)
    q, k, _ = qkv(1, 2, 2, 1024, 16, seed=9)
    density = select(q, k, causal=causal, **params).density()
    assert abs(density / (fraction / 2 if causal else fraction) - 1) < 0.25


@pytest.mark.parametrize("params", [{"block_q": 0}, {"block_k": 0}, {"top_k": 0}, {"sink": -1}, {"window": -1},
                                    {"representative": "last"}, {"top_k": 2.5}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 8)
    name = next(iter(params))
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="hip", causal=True, **params)
