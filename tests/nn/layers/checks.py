"""Checks every paper layer's tests share: causality of the whole layer, decoding with the layer's own heads and
computed parameters, and gradients reaching every part."""

from __future__ import annotations

from typing import Any

import torch

import attnzoo as az


def assert_causal(layer: az.nn.Attention, dim: int) -> None:
    """Changing tokens 7… of a 12-token input leaves the layer's outputs 0…6 unchanged."""
    x = torch.randn(1, 12, dim)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, dim)
    torch.testing.assert_close(layer(x)[:, :7], layer(y)[:, :7])


def assert_decodes_like_the_parallel_form(layer: az.nn.Attention, x: torch.Tensor, prompt: int = 6,
                                          **fixed: Any) -> None:
    """The layer's heads of ``x`` (after its parts) and the parameters its parts compute: ``attnzoo.prefill`` on the
    first ``prompt`` tokens, then one ``attnzoo.step`` per token (the computed parameters sliced per token; the
    layer's fixed and learnable kernel parameters and ``fixed`` given once), equal the causal parallel form over all
    of ``x``."""
    with torch.no_grad():
        fixed = {**layer.fixed, **{n: p.detach() for n, p in layer.learnable.items()}, **fixed}
        q, k, v = layer.project(x)
        computed: dict[str, torch.Tensor] = {}
        if layer.parts is not None:
            q, k, v, computed = layer.parts(x, q, k, v)
        whole = az.attention(q, k, v, method=layer.method, causal=True, **fixed, **computed)
        out, state = az.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], method=layer.method,
                                **fixed, **{n: p[..., :prompt] for n, p in computed.items()})
        outs = [out]
        for t in range(prompt, x.shape[1]):
            o, state = az.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                               **{n: p[..., t:t + 1] for n, p in computed.items()})
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole)


def assert_every_part_trains(layer: az.nn.Attention, dim: int) -> None:
    """One backward pass of a random loss gives every parameter of the parts, and every learnable kernel parameter
    the layer owns, a nonzero gradient."""
    (layer(torch.randn(2, 10, dim)) * torch.randn(2, 10, dim)).sum().backward()
    named = [*(layer.parts.named_parameters() if layer.parts is not None else ()), *layer.learnable.items()]
    for name, p in named:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
