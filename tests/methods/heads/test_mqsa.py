"""H6 MQSA's L-query windows: the window means by hand, the α mix of the long and short attentions, the special
cases that reduce to softmax, the layer, parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads import mqsa

F64 = torch.float64


def qkv(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, n, 8, generator=g, dtype=F64) for _ in range(3))


def test_window_means_average_the_last_items_and_fewer_at_the_start():
    q = torch.arange(5, dtype=F64).view(1, 1, 5, 1) ** 2  # 0, 1, 4, 9, 16
    got = mqsa.window_means(q, 3, torch.zeros(1, 1, 2, 1, dtype=F64), 0).flatten().tolist()
    assert got == [0.0, 0.5, 5 / 3, 14 / 3, 29 / 3]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_output_mixes_long_and_short_window_attentions(backend: str):
    q, k, v = qkv()
    out = az.attention(q, k, v, method="mqsa", causal=True, backend=backend, long_window=3, short_window=2,
                       long_weight=0.25)

    def pooled(w: int) -> torch.Tensor:
        return torch.stack([q[:, :, max(0, t - w + 1): t + 1].mean(2) for t in range(q.shape[2])], dim=2)
    long_, short = (az.attention(pooled(w), k, v, method="softmax", causal=True) for w in (3, 2))
    torch.testing.assert_close(out, 0.25 * long_ + 0.75 * short)


def test_single_item_queries_are_softmax_attention():
    q, k, v = qkv()
    softmax = az.attention(q, k, v, method="softmax", causal=True)
    torch.testing.assert_close(az.attention(q, k, v, method="mqsa", causal=True, long_weight=0.0), softmax)
    same = az.attention(q, k, v, method="mqsa", causal=True, long_window=1, long_weight=0.7)
    torch.testing.assert_close(same, softmax)


def test_the_layer_runs_mqsa_and_is_causal():
    torch.manual_seed(0)
    layer = az.nn.Attention(16, 4, method="mqsa", causal=True, long_window=4)
    x = torch.randn(1, 12, 16)
    y = x.clone()
    y[:, 7:] += 1.0
    torch.testing.assert_close(layer(x)[:, :7], layer(y)[:, :7])


@pytest.mark.parametrize(
    ("name", "value"),
    [("long_window", 0), ("short_window", 1.5), ("long_weight", 1.5), ("long_weight", -0.1)],
)
def test_bad_parameters_name_themselves(name: str, value: object):
    q, k, v = qkv()
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        az.attention(q, k, v, method="mqsa", **{name: value})
