"""Titans' Memory-as-a-Layer block: the memory over the persistent tokens and the sequence, then one softmax over the
memory's outputs at the persistent positions and a causal window (against a dense masked softmax); causal, every
parameter trains, bad arguments fail."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def test_the_block_is_the_memory_then_window_attention_over_its_outputs() -> None:
    torch.manual_seed(0)
    dim, heads, prefix, window, n = 12, 3, 2, 3, 9
    block = az.nn.TitansMAL(dim, heads, window=window, persistent=prefix, chunk_size=4).double()
    x = torch.randn(2, n, dim, dtype=torch.float64)
    y = block.memory(torch.cat([block.persistent.expand(2, -1, -1), x], dim=1))  # eq. (30), over P ‖ x
    q, k, v = (t.view(2, prefix + n, heads, dim // heads).transpose(1, 2)
               for t in (y @ block.attend.qkv.weight.T).chunk(3, dim=-1))
    i = torch.arange(n)[:, None]
    j = torch.arange(prefix + n)[None, :] - prefix
    visible = (j < 0) | ((j <= i) & (j >= i - window))
    logits = (q[:, :, prefix:] @ k.transpose(-1, -2)) / (dim // heads) ** 0.5
    attended = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ v
    want = block.out(attended.transpose(1, 2).reshape(2, n, dim))
    torch.testing.assert_close(block(x), want)


@pytest.mark.parametrize("memory", ["titans", "titans_mlp"])
def test_the_block_is_causal_and_every_parameter_trains(memory: str) -> None:
    torch.manual_seed(0)
    block = az.nn.TitansMAL(24, 4, window=3, persistent=2, memory=memory, chunk_size=4)
    x = torch.randn(2, 10, 24)
    out = block(x)
    assert out.shape == (2, 10, 24)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 4, 24)
    torch.testing.assert_close(block(later)[:, :6], out[:, :6])
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(AttnzooError, match="^memory:"):
        az.nn.TitansMAL(24, 4, memory="gated_delta")
    with pytest.raises(AttnzooError, match="^window:"):
        az.nn.TitansMAL(24, 4, window=0)
    with pytest.raises(AttnzooError, match="^persistent:"):
        az.nn.TitansMAL(24, 4, persistent=1.5)
    with pytest.raises(AttnzooError, match="^x:"):
        az.nn.TitansMAL(24, 4)(torch.randn(2, 5, 23))
    with pytest.raises(AttnzooError, match="^chunk_size:"):
        az.nn.TitansMAL(24, 4, chunk_size=0)
