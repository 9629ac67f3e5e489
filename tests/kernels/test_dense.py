"""``attention_lse``: the CPU flash path and the portable chunked path give the dense definition's output and
log-sum-exp, with gradients through both, empty rows included."""

from __future__ import annotations

import pytest
import torch

from attnzoo import masks
from attnzoo.kernels import dense
from attnzoo.kernels.dense import attention_lse, softmax_attention_lse


def _inputs(dv: int, bias_grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, dv, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 6, 11, generator=g, dtype=torch.float64, requires_grad=bias_grad)
    mask = torch.rand(2, 1, 6, 11, generator=g) < 0.7
    mask[:, :, 2] = False
    return q, k, v, bias, mask


def _value_and_grads(out: torch.Tensor, lse: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (lse.masked_fill(torch.isneginf(lse), 0) * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    return [out, lse, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize(("dv", "bias_grad", "chunk"), [(8, False, None), (5, False, None), (8, True, 7)])
def test_both_paths_match_the_dense_definition(monkeypatch, dv, bias_grad, chunk):
    """``dv == d`` takes the flash kernel; ``dv != d`` or a bias needing a gradient the chunked path (here in chunks
    of one query row when ``chunk`` caps the logits per chunk)."""
    if chunk is not None:
        monkeypatch.setattr(dense, "LSE_CHUNK_LOGITS", chunk)
    q, k, v, bias, mask = _inputs(dv, bias_grad)
    inputs = [q, k, v] + ([bias] if bias_grad else [])
    got = _value_and_grads(*attention_lse(q, k, v, causal=True, scale=0.4, mask=mask, bias=bias), inputs)
    seen = masks.combine(True, mask, 6, 11, q.device)
    want = _value_and_grads(*softmax_attention_lse(q, k, v, 0.4, seen, bias), inputs)
    assert torch.isneginf(got[1][:, :, 2]).all() and (got[0][:, :, 2] == 0).all()
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a.masked_fill(torch.isneginf(a), 0)).all()
        torch.testing.assert_close(a, b)


def test_plain_causal_self_attention_uses_no_mask_tensor_and_matches():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = attention_lse(q, k, v, causal=True, scale=0.3, mask=None, bias=None)
    want_out, want_lse = softmax_attention_lse(q, k, v, 0.3, masks.combine(True, None, 9, 9, q.device))
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_transposed_views_give_the_same_result_as_contiguous_inputs():
    """The CPU flash kernel reads the last dim as unit-stride; views whose last dim is strided are copied first."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g).transpose(2, 3) for _ in range(3))  # (1, 2, 16, 8), stride 16
    assert q.stride(-1) != 1
    out, lse = attention_lse(q, k, v, causal=False, scale=0.3, mask=None, bias=None)
    want_out, want_lse = attention_lse(q.contiguous(), k.contiguous(), v.contiguous(), causal=False, scale=0.3,
                                       mask=None, bias=None)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
