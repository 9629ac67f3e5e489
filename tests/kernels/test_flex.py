"""FlexAttention backends of the banded methods (neighborhood, sliding window) against the dense reference."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from tests.helpers import qkv


@pytest.mark.flex
def test_flex_backends_forward():
    with torch.no_grad():
        q, k, v = (t.float() for t in qkv(1, 2, 1, 300, requires_grad=True))
        for method, causal, params in (("neighborhood", False, dict(kernel_size=(5, 7), dilation=(2, 1),
                                        layout=(15, 20))), ("sliding_window", True, dict(window=37))):
            ref = az.attention(q, k, v, method=method, causal=causal, backend="reference", **params)
            out = az.attention(q, k, v, method=method, causal=causal, backend="flex", **params)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_flex_refuses_the_log_sum_exp_on_cpu_and_auto_takes_another_path():
    """PyTorch's CPU lowering of FlexAttention cannot return the log-sum-exp: the flex backend refuses it, naming why,
    and ``backend="auto"`` serves it from another path."""
    q, k, v = (t.float() for t in qkv(1, 2, 1, 64))
    with pytest.raises(az.AttnzooError, match="log-sum-exp on CPU"):
        az.attention(q, k, v, method="sliding_window", window=8, backend="flex", return_lse=True)
    out, lse = az.attention(q, k, v, method="sliding_window", window=8, return_lse=True)
    ref, ref_lse = az.attention(q, k, v, method="sliding_window", window=8, backend="reference", return_lse=True)
    torch.testing.assert_close((out, lse), (ref, ref_lse))
