"""Titans' Memory-as-a-Gate block against eqs. (26)–(28). The window attention itself (against a dense softmax) and
the shared frame (causality, training, bad arguments) are tested in ``test_titans_common.py``."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.titans_common import prefixed_window_attention


def test_the_block_gates_window_attention_with_the_memory() -> None:
    torch.manual_seed(0)
    dim, heads, prefix, window, n = 12, 3, 2, 3, 9
    block = az.nn.TitansMAG(dim, heads, window=window, persistent=prefix, chunk_size=4).double()
    x = torch.randn(2, n, dim, dtype=torch.float64)
    xt = torch.cat([block.persistent.expand(2, -1, -1), x], dim=1)  # (26)
    q, k, v = (t.view(2, prefix + n, heads, dim // heads).transpose(1, 2)
               for t in (xt @ block.attend.qkv.weight.T).chunk(3, dim=-1))
    y = prefixed_window_attention(q[:, :, prefix:], k, v, prefix, window).transpose(1, 2).reshape(2, n, dim)  # (27)
    m = block.memory(xt)[:, prefix:]
    want = block.gate.out(block.gate.norm_y(y) * torch.sigmoid(block.gate.norm_m(m)))  # (28)
    torch.testing.assert_close(block(x), want)
