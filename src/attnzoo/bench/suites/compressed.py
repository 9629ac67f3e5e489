"""Suite ``compressed``: H4 compressed convolutional attention (issue 15's CCA floor).

The MHA layer being compressed is the case's shape: ``dim = heads · head_dim`` = 512, H = 8, D = 64, B = 1, fp32.
CCA with compression C = 4 keeps D = 64 and attends with H / C = 2 latent heads (the released layer's geometry, see
:mod:`attnzoo.nn.cca`), so its attention costs 1/4 of MHA's FLOPs and caches 1/4 of its KV bytes
(:func:`attnzoo.methods.heads.cca.cost`; the bytes are checked in ``tests/methods/heads/test_cca.py``).

- ``cca_c4_16k_causal``, ``cca_c4_16k``: the attention part — CCA's ``sdpa`` path on the latents (both convolutions,
  q-k mean, normalisation, value shift, then SDPA over 2 heads) against SDPA over MHA's 8 heads, N = 16384, causal
  and not. Floor: ≥ 2.5× (ideal 4×);
- ``ccgqa_c2_kv8_16k_causal``: CCGQA's attention part (4 latent query heads sharing 1 key/value head) against the
  same SDPA, causal; no floor (ideal 2×, KV bytes 1/8);
- ``cca_layer_c4_16k_causal``: the whole layer (:class:`attnzoo.nn.CompressedConvAttention`, projections included)
  against :class:`attnzoo.nn.Attention` with MHA's 8 heads, N = 16384, causal, forward; no floor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import attnzoo as az
from attnzoo.bench.suites import Case, Target, at_least
from attnzoo.methods.heads.cca import initial_parameters, sdpa_latent

COMPRESSION = 4

Call = Callable[[], Any]


def _latent_call(case: Case, device: str, heads: int, kv_heads: int) -> Call:
    """CCA's attention part on random latents (seed 0) with freshly initialised convolutions."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.batch, h, case.n, case.head_dim, generator=g).to(device)
               for h in (heads, kv_heads, kv_heads))
    torch.manual_seed(0)
    params = {n: t.to(device) for n, t in initial_parameters(heads, kv_heads, case.head_dim).items()}
    scale = case.head_dim ** -0.5
    return lambda: sdpa_latent(q, k, v, causal=case.causal, scale=scale, mask=None, bias=None, value_shift=True,
                               **params)


def latent_attention_call(case: Case, device: str) -> Call:
    """CCA (C = 4): ``heads / 4`` latent query and key/value heads."""
    return _latent_call(case, device, case.heads // COMPRESSION, case.heads // COMPRESSION)


def ccgqa_attention_call(case: Case, device: str) -> Call:
    """CCGQA (C = 2, C_kv = 8): ``heads / 2`` latent query heads sharing ``heads / 8`` key/value heads."""
    return _latent_call(case, device, case.heads // 2, case.heads // 8)


def _layer_call(case: Case, device: str, compressed: bool) -> Call:
    torch.manual_seed(0)
    dim = case.heads * case.head_dim
    layer = (az.nn.CompressedConvAttention(dim, case.heads, compression=COMPRESSION, causal=case.causal)
             if compressed else az.nn.Attention(dim, case.heads, causal=case.causal)).to(device)
    x = torch.randn(case.batch, case.n, dim, generator=torch.Generator().manual_seed(0)).to(device)
    return lambda: layer(x)


def cca_layer_call(case: Case, device: str) -> Call:
    """The CCA layer's forward on ``x (B, N, heads·head_dim)``."""
    return _layer_call(case, device, compressed=True)


def mha_layer_call(case: Case, device: str) -> Call:
    """The MHA layer's (``az.nn.Attention``, softmax) forward on the same ``x``."""
    return _layer_call(case, device, compressed=False)


CCA_PART = Target(f"CCA C={COMPRESSION} attention part (sdpa)", workload=latent_attention_call)


def _part(causal: bool) -> Case:
    tag = "_causal" if causal else ""
    return Case(f"cca_c{COMPRESSION}_16k{tag}",
                f"CCA C={COMPRESSION} attention part (convolutions, q-k mean, norms, value shift, SDPA over "
                f"{8 // COMPRESSION} latent heads) vs SDPA over MHA's 8 heads, {'causal' if causal else 'noncausal'}, "
                "B=1 D=64 N=16384; KV bytes 0.25x", "compare", CCA_PART, causal=causal,
                floors={"speedup": at_least(2.5)}, rounds=3, threads=1)


CASES = (
    _part(True),
    _part(False),
    Case("ccgqa_c2_kv8_16k_causal", "CCGQA C=2, C_kv=8 attention part (4 latent query heads, 1 KV head) vs SDPA "
         "over MHA's 8 heads, causal, B=1 D=64 N=16384 (ideal 2x; KV bytes 0.125x)", "compare",
         Target("CCGQA C=2 C_kv=8 attention part (sdpa)", workload=ccgqa_attention_call), causal=True, rounds=3,
         threads=1),
    Case(f"cca_layer_c{COMPRESSION}_16k_causal", f"az.nn.CompressedConvAttention C={COMPRESSION} vs az.nn.Attention "
         "MHA, whole layer forward (projections included), dim 512 H=8 D=64, causal, N=16384", "compare",
         Target(f"CCA layer C={COMPRESSION}", workload=cca_layer_call),
         against=Target("MHA layer", workload=mha_layer_call), causal=True, rounds=3, threads=1),
)
