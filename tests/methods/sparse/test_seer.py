"""D6 seer: the training-free gate is the pooled scores and the identity gates equal it, the threshold and top-k rules,
a planted block is found, causality (no future block, no dependence on a later token), determinism, the fast path
against the reference (fp64, GQA, ragged tails, learned gates, forward and backward), the distillation target against
a dense computation (chunked or not), distillation lowers the loss (functional and in the nn layer), decoding over
ragged prompts, at_density, and bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse import seer
from attnzoo.registry import Call, LayerInfo
from tests.helpers import F64, assert_decodes, assert_matches_reference, qkv


def _mean_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return torch.stack([x[:, :, s : s + block].mean(2) for s in range(0, x.shape[2], block)], dim=2)


def _gates(h: int, hkv: int, d: int, seed: int = 0, noise: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    info = LayerInfo(h, hkv, d, {})
    return {"q_gate": seer.identity_q_gate(info).double() + noise * torch.randn(h, d, d, generator=gen, dtype=F64),
            "k_gate": seer.identity_k_gate(info).double() + noise * torch.randn(hkv, 3 * d, d, generator=gen,
                                                                                  dtype=F64)}


def test_training_free_gate_is_the_pooled_scores_and_the_identity_gates_equal_it():
    q, k, _ = qkv(2, 4, 2, 22, seed=1)
    scale = 1 / math.sqrt(8)
    got = seer.gate_logits(q, k, block_size=5, causal=False, scale=scale)
    want = scale * _mean_blocks(q, 5) @ _mean_blocks(k, 5).repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(got, want)
    identity = _gates(4, 2, 8, noise=0.0)
    for causal in (False, True):
        torch.testing.assert_close(
            seer.gate_logits(q, k, block_size=5, causal=causal, scale=scale, **identity),
            seer.gate_logits(q, k, block_size=5, causal=causal, scale=scale))


def test_threshold_keeps_the_blocks_above_it_and_top_k_the_largest():
    q, k, _ = qkv(1, 2, 2, 40, seed=2)
    gates = _gates(2, 2, 8, seed=3)
    logits = seer.gate_logits(q, k, block_size=4, causal=False, scale=0.3, **gates)
    p = torch.softmax(logits, -1)
    sel = seer.select(q, k, causal=False, scale=0.3, block_size=4, threshold=0.08, **gates)
    assert torch.equal(sel.blocks(), p > 0.08)
    sel = seer.select(q, k, causal=False, scale=0.3, block_size=4, top_k=3, **gates)
    assert torch.equal(sel.blocks(), p >= p.topk(3, dim=-1).values[..., -1:])


def test_a_planted_block_is_selected():
    q, k, _ = qkv(1, 1, 1, 64, seed=4)
    k[:, :, 40:48] += 3.0 * q[:, :, :].mean(2, keepdim=True) / q.mean(2).norm()  # block 5 aligned with every query
    q = q + 2.0 * q.mean(2, keepdim=True)
    sel = seer.select(q, k, causal=False, scale=1 / math.sqrt(8), block_size=8, top_k=1)
    assert bool((sel.indices[..., 0] == 5).all())


@pytest.mark.parametrize("query_block", [None, 1, 3])
def test_causal_selections_never_reach_a_future_key(query_block):
    q, k, _ = qkv(2, 4, 2, 37, seed=5)
    for params in ({"top_k": 4}, {"threshold": 0.0}):
        sel = seer.select(q, k, causal=True, scale=0.35, block_size=4, query_block=query_block, **params,
                          **_gates(4, 2, 8))
        bq = sel.block_q
        last = torch.clamp((torch.arange(sel.num_q_blocks) + 1) * bq, max=37) - 1
        first_key = sel.indices.clamp(min=0) * 4
        assert bool(((first_key <= last.view(1, 1, -1, 1)) | (sel.indices < 0)).all())


def test_causal_no_output_depends_on_a_later_token():
    q, k, v = qkv(1, 2, 1, 30, seed=6)
    params = {"block_size": 4, "query_block": 1, "threshold": 0.05, **_gates(2, 1, 8)}
    out = az.attention(q, k, v, method="seer", causal=True, backend="torch", **params)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 14:] = torch.randn_like(t[:, :, 14:])
    again = az.attention(q2, k2, v2, method="seer", causal=True, backend="torch", **params)
    torch.testing.assert_close(again[:, :, :14], out[:, :, :14], atol=0, rtol=0)


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 50, seed=7, dtype=torch.float32)
    runs = [az.attention(q, k, v, method="seer", causal=True, backend="torch", block_size=8, threshold=0.1)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "causal", "params"), [
    (2, 4, 2, 37, 37, True, {"block_size": 5, "top_k": 3}),
    (1, 2, 2, 16, 16, False, {"block_size": 4, "threshold": 0.1}),
    (2, 6, 3, 19, 30, True, {"block_size": 7, "query_block": 2, "top_k": 2}),
    (1, 2, 1, 25, 11, False, {"block_size": 3, "query_block": 1, "threshold": 0.02}),
])
@pytest.mark.parametrize("learned", [False, True])
def test_torch_matches_reference(b, h, hkv, sq, skv, causal, params, learned):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=8, requires_grad=True)
    gates = _gates(h, hkv, 8) if learned else {}
    assert_matches_reference("seer", q, k, v, causal=causal, **params, **gates)


def _dense_target(q, k, block, causal, pool):
    h, n = q.shape[1], k.shape[2]
    s = q @ k.repeat_interleave(h // k.shape[1], 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(q.shape[2], n, dtype=torch.bool).triu(1 + n - q.shape[2]), float("-inf"))
    p = torch.softmax(s, -1)
    rows = [torch.stack([getattr(p[:, :, a : a + block, c : c + block], "amax" if pool == "max" else "sum")((2, 3))
                         for c in range(0, n, block)], -1) for a in range(0, q.shape[2], block)]
    t = torch.stack(rows, 2)
    return t / t.sum(-1, keepdim=True)


@pytest.mark.parametrize("pool", ["max", "sum"])
@pytest.mark.parametrize("causal", [False, True])
def test_gate_target_is_the_pooled_attention_map_chunked_or_not(monkeypatch, pool, causal):
    q, k, _ = qkv(2, 4, 2, 27, seed=9)
    want = _dense_target(q, k, 4, causal, pool)
    torch.testing.assert_close(seer.gate_target(q, k, block_size=4, causal=causal, pool=pool), want)
    monkeypatch.setattr(seer, "TARGET_CHUNK", 1)  # one query block per chunk
    torch.testing.assert_close(seer.gate_target(q, k, block_size=4, causal=causal, pool=pool), want)


def test_distillation_lowers_the_loss_and_the_learned_gate_finds_more_mass():
    gen = torch.Generator().manual_seed(10)
    q, k, _ = qkv(1, 2, 2, 64, seed=gen)
    q, k = q @ torch.randn(8, 8, generator=gen, dtype=F64), k.flip(-1)  # pooled scores mislead the default gate
    gates, history = seer.distill_gate(q, k, block_size=8, causal=True, steps=8, lr=0.1)
    assert history[-1] < 0.5 * history[0]
    target = seer.gate_target(q, k, block_size=8, causal=True, pool="sum")

    def recall(**g):
        sel = seer.select(q, k, causal=True, scale=1 / math.sqrt(8), block_size=8, top_k=2, **g)
        return float((target * sel.blocks()).sum())

    assert recall(**gates) > recall()


def test_the_nn_layer_owns_the_gate_and_distils_it():
    torch.manual_seed(0)
    layer = az.nn.SeerAttention(32, 4, kv_heads=2, block_size=4, top_k=2)
    assert {n: tuple(p.shape) for n, p in layer.learnable.items()} == {"q_gate": (4, 8, 8), "k_gate": (2, 24, 8)}
    x = torch.randn(2, 24, 32)
    assert layer(x).shape == (2, 24, 32)
    opt = torch.optim.Adam(layer.learnable.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = layer.gate_loss(x)
        opt.zero_grad()
        loss.backward()
        assert layer.q_proj.weight.grad is None  # the projections stay frozen
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("params", [{"top_k": 2}, {"threshold": 0.05}])
def test_decoding_ragged_prompts_equals_the_causal_forward(params):
    q, k, v = qkv(3, 4, 2, 26, seed=11)
    assert_decodes("seer", q, k, v, [5, 11, 8], block_size=4, query_block=1, **params, **_gates(4, 2, 8))
    assert_decodes("seer", q, k, v, [7, 3, 9], block_size=3, query_block=1, **params)


def test_at_density_reads_the_fraction_of_the_keys():
    for causal in (False, True):
        call = Call(1, 2, 2, 2048, 2048, 8, 8, causal, torch.device("cpu"), torch.float32, False, False, False)
        params = az.get("seer").spec.at_density(call, 1 / 8)
        q, k, _ = qkv(1, 2, 2, 2048, seed=12, dtype=torch.float32)
        sel = seer.select(q, k, causal=causal, scale=0.35, **params)
        allowed = 0.5 if causal else 1.0
        assert abs(sel.density() / allowed - 1 / 8) < 0.02


@pytest.mark.parametrize(("params", "name"), [
    ({"block_size": 4, "top_k": 5}, "top_k"), ({"block_size": 0}, "block_size"), ({"threshold": 1.5}, "threshold"),
    ({"query_block": 0}, "query_block"), ({"q_gate": torch.zeros(2, 8, 8, dtype=F64)}, "q_gate"),
    ({"q_gate": torch.zeros(2, 8, 8, dtype=F64), "k_gate": torch.zeros(2, 8, 8, dtype=F64)}, "k_gate"),
    ({"q_gate": torch.zeros(2, 8, 8, dtype=F64), "k_gate": torch.zeros(2, 24, 4, dtype=F64)}, "q_gate"),
])
def test_bad_parameters_name_the_argument(params, name):
    q, k, v = qkv(1, 2, 2, 16)
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        az.attention(q, k, v, method="seer", causal=True, **params)


def test_decoding_needs_query_blocks_of_one_token():
    q, k, v = qkv(1, 2, 2, 16)
    with pytest.raises(AttnzooError, match="^query_block:"):
        az.prefill(q, k, v, method="seer", block_size=4)


def test_strided_inputs_whose_length_fills_the_blocks():
    q, k, v = qkv(2, 4, 2, 32, seed=21)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    params = {"block_size": 8, "top_k": 2}
    torch.testing.assert_close(az.attention(*strided, method="seer", causal=True, backend="torch", **params),
                               az.attention(q, k, v, method="seer", causal=True, backend="reference", **params))
