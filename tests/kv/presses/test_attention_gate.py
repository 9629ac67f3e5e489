"""K7 AttentionGatePress: flags decide the kept set, ratios honoured, steps evict flagged tokens, training, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import AttentionGate, AttentionGatePress, train_attention_gate
from tests.helpers import F64, qkv

D = 8
FLAGS = torch.tensor([5.0, -5, 5, -5, -5, 5, 5, -5])  # the keep logit of a token whose key is e_i


def self_reading_gate(kv_heads: int = 1) -> AttentionGate:
    """Each token attends (almost only) to itself and reads its key's flag: key e_i gets logit FLAGS[i]."""
    gate = AttentionGate(kv_heads, D, dim=D, dtype=F64)
    with torch.no_grad():
        for w in (gate.w_q, gate.w_k):
            w.copy_(10 * torch.eye(D, dtype=F64).expand(kv_heads, D, D))
        gate.w_v.copy_(torch.eye(D, dtype=F64).expand(kv_heads, D, D))
        gate.w_o.copy_(FLAGS.to(F64).expand(kv_heads, D))
        gate.bias.zero_()
    return gate


def one_hot_prompt(b: int = 1, hkv: int = 1, order=range(D)):
    k = torch.eye(D, dtype=F64)[list(order)].expand(b, hkv, -1, D).contiguous()
    q, _, v = qkv(b, 2 * hkv, hkv, k.shape[2], d=D)
    return q, k, v


def kept(cache, b=0, h=0):
    pos = cache.positions[b, h]
    return sorted(pos[pos >= 0].tolist())


def test_flags_decide_the_kept_tokens() -> None:
    q, k, v = one_hot_prompt()
    _, state = az.prefill(q, k, v, method="softmax", press=AttentionGatePress(gate=self_reading_gate()))
    assert kept(state.data) == [0, 2, 5, 6]


def test_a_ratio_or_budget_keeps_the_top_flags_exactly() -> None:
    q, k, v = one_hot_prompt()
    gate = self_reading_gate()
    _, state = az.prefill(q, k, v, method="softmax", press=AttentionGatePress(compression_ratio=0.75, gate=gate))
    assert len(kept(state.data)) == 2 and set(kept(state.data)) <= {0, 2, 5, 6}
    _, state = az.prefill(q, k, v, method="softmax", press=AttentionGatePress(budget=6, gate=gate))
    assert len(kept(state.data)) == 6 and {0, 2, 5, 6} <= set(kept(state.data))
    press = AttentionGatePress.for_budget(0.5, gate=gate)
    _, state = az.prefill(q, k, v, method="softmax", press=press)
    assert kept(state.data) == [0, 2, 5, 6]


def test_steps_evict_flagged_tokens_with_ragged_batches() -> None:
    q, k, v = one_hot_prompt(b=2, hkv=2, order=[0, 1, 2, 3])
    press = AttentionGatePress(gate=self_reading_gate(kv_heads=2))
    _, state = az.prefill(q, k, v, method="softmax", lengths=torch.tensor([4, 2]), press=press)
    assert kept(state.data, 0) == [0, 2] and kept(state.data, 1) == [0]
    eye = torch.eye(D, dtype=F64)
    for token, (keep0, keep1) in ((4, ([0, 2], [0])), (5, ([0, 2, 5], [0, 3]))):
        k1 = eye[token].expand(2, 2, 1, D)
        q1, _, v1 = qkv(2, 4, 2, 1, d=D, seed=token)
        out, state = az.step(state, q1, k1, v1)
        assert kept(state.data, 0) == keep0 and kept(state.data, 1) == keep1  # e_4 is evicted, e_5 kept
        assert torch.isfinite(out).all()


def test_training_fits_quickly_and_the_sparsity_term_evicts() -> None:
    torch.manual_seed(0)
    batches = [qkv(2, 2, 1, 16, d=D, seed=s, dtype=torch.float32) for s in range(2)]
    gate = AttentionGate(1, D)
    losses = train_attention_gate(gate, batches, steps=20, lr=0.05, sparsity=0.0)
    assert losses[-1] < losses[0]
    sparse = AttentionGate(1, D)
    train_attention_gate(sparse, batches, steps=20, lr=0.05, sparsity=5.0)
    positions = torch.arange(16).expand(1, 1, 16)
    with torch.no_grad():
        keep_dense = torch.sigmoid(gate(batches[0][1][:1], positions)).mean()
        keep_sparse = torch.sigmoid(sparse(batches[0][1][:1], positions)).mean()
    assert keep_sparse < keep_dense


def test_bad_arguments_are_named() -> None:
    with pytest.raises(AttnzooError, match="^gate:"):
        AttentionGatePress()
    with pytest.raises(AttnzooError, match="^threshold:"):
        AttentionGatePress(gate=self_reading_gate(), threshold=1.0)
    with pytest.raises(AttnzooError, match="^compression_ratio:"):
        AttentionGatePress(gate=self_reading_gate(), compression_ratio=1.0)
    with pytest.raises(AttnzooError, match="^dim:"):
        AttentionGate(1, D, dim=0)
    q, k, v = one_hot_prompt(hkv=1)
    with pytest.raises(AttnzooError, match="^gate:"):
        az.prefill(q, k, v, method="softmax", press=AttentionGatePress(gate=self_reading_gate(kv_heads=2)))
    with pytest.raises(AttnzooError, match="^sparsity:"):
        train_attention_gate(self_reading_gate(), [(q, k, v)], sparsity=-1.0)
