"""The nn layer in a training loop, the CLI, and the generated methods table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnzoo as az
from attnzoo.cli import main, methods_markdown
from attnzoo.errors import AttnzooError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["softmax", "sigmoid"])
def test_layer_trains(method):
    torch.manual_seed(0)
    layer = az.nn.Attention(16, 4, kv_heads=2, method=method, causal=True)
    x = torch.randn(4, 12, 16)
    target = torch.roll(x, 1, dims=1)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_layer_cross_attention_and_errors():
    layer = az.nn.Attention(16, 4, context_dim=10)
    assert layer(torch.randn(2, 5, 16), torch.randn(2, 7, 10)).shape == (2, 5, 16)
    with pytest.raises(AttnzooError, match="^kv_heads:"):
        az.nn.Attention(16, 4, kv_heads=3)
    with pytest.raises(AttnzooError, match="^method:"):
        az.nn.Attention(16, 4, method="nope")
    with pytest.raises(AttnzooError, match="^sigmoid_bias:"):
        az.nn.Attention(16, 4, method="sigmoid", sigmoid_bias="big")
    with pytest.raises(AttnzooError, match="^tempo:"):
        az.nn.Attention(16, 4, method="sigmoid", tempo=1.0)


def test_learnable_parameters_are_owned_by_the_layer():
    for m in az.methods().values():
        learnable = [p.name for p in m.params if p.init is not None]
        if not learnable:
            continue
        layer = az.nn.Attention(16, 4, kv_heads=2, method=m.name, causal="self/causal" in m.patterns)
        assert set(learnable) <= set(layer.learnable.keys())


def test_methods_table_is_up_to_date():
    path = ROOT / "docs" / "methods.md"
    assert path.read_text() == methods_markdown(), "docs/methods.md is stale: run `attnzoo list --markdown`"


def test_cli_commands(capsys):
    assert main(["list"]) == 0
    assert "sigmoid" in capsys.readouterr().out
    assert main(["info", "sigmoid"]) == 0
    assert "2409.04431" in capsys.readouterr().out
    assert main(["verify", "softmax"]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert main(["info", "sigmod"]) == 2
    assert "did you mean 'sigmoid'" in capsys.readouterr().err
