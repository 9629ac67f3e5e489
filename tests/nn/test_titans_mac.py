"""Titans' Memory-as-a-Context block against eqs. (21)–(25) written out here (segment by segment, the memory token by
token, attention as a dense masked softmax); causal across and within segments, every parameter trains, bad
arguments fail."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.square().sum(-1, keepdim=True) + 1e-6).sqrt()


def definition(block: az.nn.TitansMAC, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (21)–(25) with a linear memory per head (ℓ2 loss, gradients of a segment at its start memory)."""
    b, n, dim = x.shape
    heads, c_max, prefix = block.heads, block.segment, block.persistent.shape[0]
    d = dim // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, H, T, d)
        return t.view(b, t.shape[1], heads, d).transpose(1, 2)

    def join(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b, t.shape[2], dim)

    w_k, w_v = block.memory_kv.weight.chunk(2)
    memory = torch.zeros(b, heads, d, d, dtype=x.dtype)
    momentum = torch.zeros_like(memory)
    outs = []
    for start in range(0, n, c_max):
        s = x[:, start:start + c_max]
        c = s.shape[1]
        h = join(unit(split(s @ block.memory_q.weight.T)) @ memory)                       # (21)
        context = torch.cat([block.persistent.expand(b, -1, -1), h, s], dim=1)            # (22)
        q, k, v = (split(t) for t in (context @ block.qkv.weight.T).chunk(3, dim=-1))
        visible = torch.zeros(c, prefix + 2 * c, dtype=torch.bool)
        for i in range(c):
            visible[i, :prefix] = True
            visible[i, prefix:prefix + i + 1] = True          # memory rows j <= i
            visible[i, prefix + c:prefix + c + i + 1] = True  # segment tokens j <= i
        logits = q[:, :, -c:] @ k.transpose(-1, -2) / d**0.5
        y = join(torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ v)  # (23)
        gates = torch.sigmoid(y @ block.memory_gates.weight.T + block.memory_gates.bias).view(b, c, 3, heads)
        eta, theta, alpha = (gates[:, :, g].transpose(1, 2)[..., None, None] for g in range(3))  # (B, H, c, 1, 1)
        qy, ky, vy = unit(split(y @ block.memory_q.weight.T)), unit(split(y @ w_k.T)), split(y @ w_v.T)
        start_memory, reads = memory, []
        for i in range(c):                                                                # (24)
            error = ky[:, :, i, None] @ start_memory - vy[:, :, i, None]                  # (B, H, 1, d)
            momentum = eta[:, :, i] * momentum - theta[:, :, i] * (ky[:, :, i, :, None] @ error)
            memory = (1 - alpha[:, :, i]) * memory + momentum
            reads.append(qy[:, :, i, None] @ memory)
        outs.append(block.gate(y, join(torch.cat(reads, dim=2))))                         # (25)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(("segment", "n"), [(16, 10), (4, 10), (3, 9)])
def test_the_block_is_its_definition(segment: int, n: int) -> None:
    torch.manual_seed(0)
    block = az.nn.TitansMAC(12, 3, segment=segment, persistent=2).double()
    x = torch.randn(2, n, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x), definition(block, x))


def test_the_block_is_causal_and_every_parameter_trains() -> None:
    torch.manual_seed(0)
    block = az.nn.TitansMAC(24, 4, segment=4, persistent=2, loss="huber", delta=0.5)
    x = torch.randn(2, 11, 24)
    out = block(x)
    assert out.shape == (2, 11, 24)
    for t in (6, 8):  # within a segment and at a segment's start
        later = x.clone()
        later[:, t:] = torch.randn(2, 11 - t, 24)
        torch.testing.assert_close(block(later)[:, :t], out[:, :t])
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(AttnzooError, match="^memory:"):
        az.nn.TitansMAC(24, 4, memory="titans_mlp")
    with pytest.raises(AttnzooError, match="^segment:"):
        az.nn.TitansMAC(24, 4, segment=0)
    with pytest.raises(AttnzooError, match="^persistent:"):
        az.nn.TitansMAC(24, 4, persistent=-1)
    with pytest.raises(AttnzooError, match="^heads:"):
        az.nn.TitansMAC(24, 5)
    with pytest.raises(AttnzooError, match="^chunk_size:"):
        az.nn.TitansMAC(24, 4, chunk_size=8)
    with pytest.raises(AttnzooError, match="^loss:"):
        az.nn.TitansMAC(24, 4, loss="l7")
    with pytest.raises(AttnzooError, match="^x:"):
        az.nn.TitansMAC(24, 4)(torch.randn(2, 5, 23))
