"""The frame Titans' MAG and MAL blocks share: the window attention is one softmax over the persistent keys and a
causal window (against a dense masked softmax); each block is causal, every parameter trains, bad arguments fail."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.titans_common import prefixed_window_attention
from tests.helpers import qkv

BLOCKS = [az.nn.TitansMAG, az.nn.TitansMAL]

@pytest.mark.parametrize(("prefix", "window"), [(3, 2), (0, 4), (2, 50)])
def test_the_attention_branch_is_softmax_over_the_prefix_and_the_window(prefix: int, window: int) -> None:
    n = 11
    _, k, v = qkv(2, 3, 3, prefix + n, 5, seed=1)
    q = torch.randn(2, 3, n, 5, dtype=torch.float64)
    i = torch.arange(n)[:, None]
    j = torch.arange(prefix + n)[None, :] - prefix  # key position among the sequence's tokens (negative: prefix)
    visible = (j < 0) | ((j <= i) & (j >= i - window))
    want = az.attention(q, k, v, method="softmax", mask=visible)
    torch.testing.assert_close(prefixed_window_attention(q, k, v, prefix, window), want)


@pytest.mark.parametrize("block_type", BLOCKS)
@pytest.mark.parametrize("memory", ["titans", "titans_mlp"])
def test_the_block_is_causal_and_every_parameter_trains(block_type: type, memory: str) -> None:
    torch.manual_seed(0)
    block = block_type(24, 4, window=3, persistent=2, memory=memory, chunk_size=4)
    x = torch.randn(2, 10, 24)
    out = block(x)
    assert out.shape == (2, 10, 24)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 4, 24)
    torch.testing.assert_close(block(later)[:, :6], out[:, :6])
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("block_type", BLOCKS)
def test_bad_arguments_name_themselves(block_type: type) -> None:
    with pytest.raises(AttnzooError, match="^memory:"):
        block_type(24, 4, memory="gated_delta")
    with pytest.raises(AttnzooError, match="^window:"):
        block_type(24, 4, window=0)
    with pytest.raises(AttnzooError, match="^persistent:"):
        block_type(24, 4, persistent=-1)
    with pytest.raises(AttnzooError, match="^x:"):
        block_type(24, 4)(torch.randn(2, 5, 23))
    with pytest.raises(AttnzooError, match="^chunk_size:"):
        block_type(24, 4, chunk_size=0)
