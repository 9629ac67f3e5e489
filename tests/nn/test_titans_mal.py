"""Titans' Memory-as-a-Layer block against eqs. (29)–(31): the memory over the persistent tokens and the sequence,
then window attention over its outputs. The window attention itself (against a dense softmax) and the shared frame
(causality, training, bad arguments) are tested in ``test_titans_common.py``."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.titans_common import prefixed_window_attention


def test_the_block_is_the_memory_then_window_attention_over_its_outputs() -> None:
    torch.manual_seed(0)
    dim, heads, prefix, window, n = 12, 3, 2, 3, 9
    block = az.nn.TitansMAL(dim, heads, window=window, persistent=prefix, chunk_size=4).double()
    x = torch.randn(2, n, dim, dtype=torch.float64)
    y = block.memory(torch.cat([block.persistent.expand(2, -1, -1), x], dim=1))  # eq. (30), over P ‖ x
    q, k, v = (t.view(2, prefix + n, heads, dim // heads).transpose(1, 2)
               for t in (y @ block.attend.qkv.weight.T).chunk(3, dim=-1))
    attended = prefixed_window_attention(q[:, :, prefix:], k, v, prefix, window)  # (31)
    want = block.out(attended.transpose(1, 2).reshape(2, n, dim))
    torch.testing.assert_close(block(x), want)
