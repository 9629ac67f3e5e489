"""L8 agent attention: what the generic suite cannot know (one agent, pooled agents, agent biases, bad shapes)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.linear.agent import pooled_agents

F64 = torch.float64


def _qkv(sq: int, skv: int, h: int = 4, hkv: int = 2, d: int = 8):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, h, sq, d, generator=gen, dtype=F64),
        torch.randn(2, hkv, skv, d, generator=gen, dtype=F64),
        torch.randn(2, hkv, skv, 5, generator=gen, dtype=F64),
    )


def test_one_agent_broadcasts_its_softmax_read_to_every_query() -> None:
    q, k, v = _qkv(9, 23)
    out = az.attention(q, k, v, method="agent", num_agents=1)
    mean_q = q.mean(dim=2, keepdim=True)
    expected = az.attention(mean_q, k, v, method="softmax")
    torch.testing.assert_close(out, expected.expand_as(out))


def test_given_agents_equal_pooled_ones() -> None:
    q, k, v = _qkv(40, 40)
    pooled = az.attention(q, k, v, method="agent", num_agents=8)
    given = az.attention(q, k, v, method="agent", agents=pooled_agents(q, 8))
    torch.testing.assert_close(given, pooled)
    assert torch.allclose(pooled_agents(q, 8)[:, :, 0], q[:, :, :5].mean(dim=2))


def test_agent_biases_steer_the_softmaxes() -> None:
    q, k, v = _qkv(6, 10)
    key_bias = torch.full((1, 1, 2, 10), -1e4, dtype=F64)
    key_bias[..., 3] = 0.0  # every agent reads only key 3
    out = az.attention(q, k, v, method="agent", num_agents=2, agent_bias=key_bias)
    torch.testing.assert_close(out, v[:, :, 3:4].repeat_interleave(2, dim=1).expand_as(out))


def test_bad_agent_shapes_are_refused() -> None:
    q, k, v = _qkv(6, 10)
    with pytest.raises(AttnzooError, match="agents"):
        az.attention(q, k, v, method="agent", agents=torch.zeros(2, 4, 3, 7, dtype=F64))
    with pytest.raises(AttnzooError, match="agent_bias"):
        az.attention(q, k, v, method="agent", num_agents=2, agent_bias=torch.zeros(3, 10, dtype=F64))
    with pytest.raises(AttnzooError, match="query_bias"):
        az.attention(q, k, v, method="agent", num_agents=2, query_bias=torch.zeros(6, 3, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k[:, :, :6], v[:, :, :6], method="agent", causal=True)
