"""S7 top-k attention: k ≥ the key count is softmax, exactly k keys kept, only visible keys counted, bad k refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv, weights_of


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_topk_with_k_at_least_seq_kv_is_softmax(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 9, skv=11)
    want = az.attention(q, k, v, causal=True)
    got = az.attention(q, k, v, method="topk", causal=True, top_k=11, backend=backend)
    torch.testing.assert_close(got, want)
    got = az.attention(q, k, v, method="topk", causal=True, top_k=1000, backend=backend)
    torch.testing.assert_close(got, want)


def test_topk_keeps_exactly_k_largest() -> None:
    q, k, _ = qkv(2, 4, 2, 17)
    w = weights_of("topk", q, k, top_k=5, backend="torch")
    assert ((w > 0).sum(-1) == 5).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
    kept = logits.topk(5, dim=-1).indices
    assert (w.gather(-1, kept) > 0).all()


def test_topk_counts_only_visible_keys() -> None:
    q, k, _ = qkv(2, 4, 2, 8)
    w = weights_of("topk", q, k, top_k=3, causal=True, backend="torch")
    assert ((w > 0).sum(-1) == torch.arange(1, 9).clamp(max=3)).all()
    assert (w.triu(1) == 0).all()


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3"])
def test_topk_rejects_bad_k(bad: object) -> None:
    q, k, v = qkv(2, 4, 2, 13)
    with pytest.raises(AttnzooError, match="top_k"):
        az.attention(q, k, v, method="topk", top_k=bad)
