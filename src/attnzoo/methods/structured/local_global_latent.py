"""P12 — local + global latent attention (FIT): data tokens attend within groups, latent tokens attend globally.

Paper: "FIT: Far-reaching Interleaved Transformers" (Chen & Li, arXiv:2305.12689). FIT splits the data tokens into
groups, runs local self-attention inside each group, gives every group a few latent tokens that read from and write
back to their group (cross-attention), and runs global self-attention over all latents.

Formula as implemented (choice: FIT's four attentions — local, read, global, write — as ONE softmax over their union,
so that a single call or ``nn`` layer mixes data and latents both ways; FIT's separate sub-layers, each with its own
projections, are not offered as modes): the sequence is ``[data; latents]``, ``N_d`` data
tokens in ``G = num_groups`` contiguous groups of ``N_d / G``, then ``G · L`` latents (``L = latents_per_group``),
group-major. Query ``i`` attends with softmax to the keys ``j`` of its own group (data and latents alike) and, if ``i``
is a latent, to every latent: ``s = scale · q·k``. Predicate: :func:`attnzoo.masks.groups.latent_groups`.
Defaults ``num_groups=1``, ``latents_per_group=0`` (plain full attention). Self-attention, non-causal, no user mask or
bias; GQA supported.

Fast path ``torch`` (:func:`torch_grouped_sdpa`): two batched SDPA calls without masks on row-gathered keys (cached
index sets). Data queries of group ``g`` over the ``N_d/G + L`` keys of their group's data and latents; latent queries
of group ``g`` over all ``G·L`` latents plus their group's data. Time ``O((N_d·(N_d/G + L) + G·L·(G·L + N_d/G))·d)``
instead of ``(N_d + G·L)²·d``; no ``N × N`` tensor. ``flex`` (:func:`flex_block_mask`): the predicate's cached block
mask.

Log-sum-exp (``return_lse=True``): the output is one softmax over the union of a query's keys (its group, and every
latent for a latent), so each row's log-sum-exp is returned: the two batched calls run
:func:`attnzoo.kernels.dense.attention_lse` instead of SDPA (FlexAttention's own on GPU).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import flex
from attnzoo.kernels.dense import attention_lse
from attnzoo.masks.groups import latent_groups
from attnzoo.methods.checks import smallest_divisor
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _check_latents(value: Any, call: Call) -> str | None:
    groups = call.params.get("num_groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return None  # num_groups' own check reports it
    data = call.seq_q - groups * value
    if data < groups or data % groups:
        return (f"a count leaving a positive multiple of num_groups={groups} data tokens "
                f"(seq {call.seq_q} − num_groups·latents_per_group = {data})")
    return None


def _check_groups(value: Any, call: Call) -> str | None:
    if value > call.seq_q:
        return f"at most the sequence length {call.seq_q}"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    groups = smallest_divisor(call.seq_q)
    most = min(3, call.seq_q // groups - 1)
    return {"num_groups": groups, "latents_per_group": int(torch.randint(0, most + 1, (1,), generator=generator))}


SPEC = MethodSpec(
    name="local_global_latent",
    family="structured",
    mechanism="P12",
    paper="FIT: Far-reaching Interleaved Transformers",
    arxiv="2305.12689",
    summary="data tokens attend within their group and its latents; latents attend to all latents and their group",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("num_groups", (int,), 1, "number of contiguous groups of data tokens", low=1, check=_check_groups),
        Param("latents_per_group", (int,), 0, "latent tokens per group, after all data tokens", low=0,
              check=_check_latents),
    ),
    complexity="O((N·(N/G + L) + G·L·(G·L + N/G))·d) time, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, num_groups: int, latents_per_group: int, return_lse: bool = False,
) -> Output:
    mod = latent_groups(q.shape[2] - num_groups * latents_per_group, num_groups, latents_per_group)
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


@lru_cache(maxsize=32)
def _index_sets(n: int, g: int, lat: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per kind of query (data, then latents if any): query rows ``(G, n_q)`` and the key rows ``(G, W)`` they see."""
    nd = n - g * lat
    data = torch.arange(nd).view(g, nd // g)
    if lat == 0:
        return ((data, data),)
    latents = nd + torch.arange(g * lat).view(g, lat)
    every = latents.flatten().expand(g, -1)
    return (data, torch.cat([data, latents], dim=1)), (latents, torch.cat([every, data], dim=1))


def torch_grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, num_groups: int, latents_per_group: int, return_lse: bool = False,
) -> Output:
    b, h, n, _ = q.shape
    g = num_groups

    def pick(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``(G, W)`` of ``t (B, H', S, C)`` as ``(B·G, H', W, C)``: one gather on the ``(B, S, H', C)`` view, the
        rest free views (4-D, as CPU SDPA is much slower on 5-D inputs)."""
        got = t.transpose(1, 2)[:, rows].transpose(2, 3)
        return got.reshape(b * g, t.shape[1], rows.shape[1], t.shape[-1])

    outs, lses = [], []
    for qi, ki in _index_sets(n, g, latents_per_group):
        qi, ki = qi.to(q.device), ki.to(q.device)
        if return_lse:
            o, lse = attention_lse(pick(q, qi), pick(k, ki), pick(v, ki), causal=False, scale=scale, mask=None,
                                   bias=None)
            lses.append(lse.view(b, g, h, qi.shape[1]).transpose(1, 2).flatten(2, 3))
        else:
            o = F.scaled_dot_product_attention(pick(q, qi), pick(k, ki), pick(v, ki), scale=scale,
                                               enable_gqa=h != k.shape[1])
        outs.append(o.view(b, g, h, qi.shape[1], -1).transpose(1, 2).flatten(2, 3))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return (out, lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)) if return_lse else out


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, num_groups: int, latents_per_group: int, return_lse: bool = False,
) -> Output:
    n = q.shape[2]
    nd = n - num_groups * latents_per_group
    return flex.mask_attention(q, k, v, scale=scale, key=("local_global_latent", n, num_groups, latents_per_group),
                               mod=latent_groups(nd, num_groups, latents_per_group), return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_grouped_sdpa, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)])
