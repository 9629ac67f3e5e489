"""P11 — channel group attention (DaViT): channels are the tokens, attention runs within each group of channels.

Paper: "DaViT: Dual Attention Vision Transformers" (Ding et al., arXiv:2204.03645). A DaViT channel-attention layer
splits the ``C`` channels into ``G`` groups of ``C_g``; inside a group every channel is a token whose feature vector is
that channel over all ``N`` spatial positions, so the attention map is ``C_g × C_g`` and the cost is linear in ``N``.

Mapping onto ``(B, H, S, D)``: heads are the channel groups, ``D`` the channels of a group and ``S`` the spatial
positions (so ``az.nn.Attention(dim, heads=G, method="channel_group")`` on ``(B, N, dim)`` inputs is DaViT's layer).
Formula as implemented, per batch and head (``·ᵀ`` transposes positions and channels):

    A = softmax_row(scale · Vᵀ K)        (Dv × D: value channel i against key channel j, summed over positions)
    O = Q Aᵀ,  O[s, i] = Σ_j A[i, j] Q[s, j]          (Sq × Dv)

Choice of roles: this is DaViT's released code (``softmax(k̃ᵀ ṽ)`` applied to ``q̃``) with its three projections
renamed so that the output has ``v``'s channel count — the paper's ``softmax(Qᵀ K) Vᵀ`` is the same computation with
other names, but would force ``Dv = D``; in a layer all three are linear maps of the same input, so the model class is
the same. ``scale`` defaults to ``1/sqrt(D)``, DaViT's ``C_g^{-1/2}``. GQA: query head ``h`` uses the map of its
key/value head. Non-causal only (there is no order among channels); ``Sq`` may differ from ``Skv`` (the map sums over
the key/value positions, the output keeps the query positions); no user mask or bias (they would live on positions,
not on channel tokens).

Dense reference: every channel of every head is one token of one ``(H·Dv) × (H·D)`` attention masked to equal groups.
Fast path ``torch`` (:func:`torch_channel_tokens`): per KV head, one ``(Dv, S) @ (S, D)`` product for the logits, a
``Dv × D`` softmax and one ``(G·Sq, D) @ (D, Dv)`` product with the ``G`` query heads of the KV head stacked as rows (no
copies for GQA): O(S·D·Dv) per head — linear in the sequence — instead of the reference's O(S·H²·D·Dv). (SDPA with
channels as its sequence axis computes the same but is several times slower on CPU with a feature axis of length S.)

No log-sum-exp (``return_lse``): the softmax rows are value channels normalised over key channels, not query positions
over keys, so there is no per-query ``(B, H, Sq)`` log-sum-exp, and positions split into parts do not merge by one.
"""

from __future__ import annotations

import torch

from attnzoo.methods.common import repeat_kv, safe_softmax
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, MethodSpec, register

SPEC = MethodSpec(
    name="channel_group",
    family="structured",
    mechanism="P11",
    paper="DaViT: Dual Attention Vision Transformers",
    arxiv="2204.03645",
    summary="channels as tokens: a C_g × C_g attention map per head (channel group), linear in the sequence",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    complexity="O(S·D·Dv) time per head, O(S·D + D·Dv) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    b, h, sq, d = q.shape
    dv = v.shape[-1]
    kk, vv = repeat_kv(k, h), repeat_kv(v, h)
    # Channel tokens of all heads at once: (B, H·C, positions).
    queries = vv.transpose(-1, -2).reshape(b, h * dv, -1)
    keys = kk.transpose(-1, -2).reshape(b, h * d, -1)
    values = q.transpose(-1, -2).reshape(b, h * d, sq)
    same_group = torch.arange(h * dv).unsqueeze(1) // dv == torch.arange(h * d).unsqueeze(0) // d
    weights = safe_softmax(scale * queries @ keys.transpose(-1, -2), same_group.to(q.device))
    return (weights @ values).reshape(b, h, dv, sq).transpose(-1, -2)


def torch_channel_tokens(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    b, h, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    weights = torch.softmax(scale * v.transpose(-1, -2) @ k, dim=-1)  # (B, Hkv, Dv, D): one small map per group
    # The G query heads of a KV head stacked as rows: one (G·Sq, D) @ (D, Dv) product per KV head, no copies.
    return (q.reshape(b, hkv, -1, d) @ weights.transpose(-1, -2)).view(b, h, sq, dv)


register(SPEC, reference, [Backend("torch", torch_channel_tokens)])
