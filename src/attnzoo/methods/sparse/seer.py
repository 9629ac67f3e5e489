"""D6 — SeerAttention: a learnable gate on pooled queries and keys picks the key blocks; block-sparse attention.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., arXiv:2410.13276); code
github.com/microsoft/SeerAttention (``seer_attn/prefill_sparse/attn_gate.py``: the AttnGate;
``seer_attn/modules/common.py``: the threshold and top-k rules; ``seer_attn/kernels/attn_pooling_kernel_2d.py``: the
distillation target).

Formula as implemented. Queries are cut into blocks of ``query_block`` rows (default: ``block_size``, as the paper's
prefill), keys into blocks of ``block_size`` (the last of each may be partial). The **gate** (the paper's AttnGate, its
default ``Qavg_Kmaxminavg``) pools each query block by its mean and each key block by its max, min and mean
(concatenated, ``3D`` features), projects both per head and scores every pair::

    G_ab = (mean(Q_a) W^q_h) · ([max; min; mean](K_b) W^k_{h_kv}) / √F        W^q (H, D, F), W^k (Hkv, 3D, F)

``q_gate = W^q`` and ``k_gate = W^k`` are learnable tensors owned by the ``nn`` layer (:class:`attnzoo.nn.Attention`
with ``method="seer"``, or :class:`attnzoo.nn.SeerAttention`, which adds the gate's distillation loss); their ``init``
(``W^q = I``, ``W^k = [0; 0; I]``, ``F = D``) starts the gate at the training-free default. Without them (both None)
the gate is **training-free**: ``G_ab = scale · mean(Q_a) · mean(K_b)`` (pooled scores). The block mask comes from
the gate by one of the paper's two rules: ``top_k`` given — the ``top_k`` highest-gate allowed blocks per query block
(the code's ``nz_ratio`` form, with the count given directly); else the **threshold** rule — the allowed blocks whose
gate probability ``softmax_b(G_ab)`` (over the allowed blocks) exceeds ``threshold`` (default ``2e-3``, the config's
documented default; the README's typical range is 5e-4–5e-3). Then exact softmax over the keys of the selected blocks
(causal inside them when causal)::

    O_i = softmax_{j ∈ S(a(i)), j visible to i}(scale · q_i·k_j) V

Causal calls (the LLM prefill setting): future key blocks are never allowed (a block is allowed iff its first key is
visible to the query block's last query, bottom-right aligned), and the key block that holds the last key a query
block may see is pooled over its visible keys only (its causal prefix), so that no selection depends on a later
token. With ``query_block = block_size`` on self-attention that block is whole, as in the paper.

Choices: the gate sees the ``q``/``k`` given to attention (SeerAttention applies RoPE to the pooled features with
block positions; a model that wants it rotates before calling). Rows of a query block that select nothing get 0 (the
threshold rule can leave a row empty). Not included: SeerAttention's ``last_block_dense`` (the prompt's last two query
blocks kept dense: a prompt-layout heuristic; a selection can be edited by hand and given to ``block_sparse``), its
other pooling combinations, and the first quarter of query blocks that its training drops for stability.

Distillation (:func:`gate_target`, :func:`gate_loss`, :func:`distill_gate`): the paper trains the gate, with the model
frozen, to match the **block-level max-pooled attention map** of full attention (``max`` over the block's queries and
keys of the softmax probabilities, then each row normalised over the key blocks; ``pool="sum"`` gives the block mass
instead) by the KL divergence to ``softmax(G)``. :func:`gate_target` computes it a few query blocks at a time
(``O(chunk · Skv)`` memory, never the whole ``N × N`` map).

Reference (:func:`reference`): :func:`select` (the gate and rule above, on the same inputs), expanded to a dense mask
AND causal, then a dense masked softmax. Fast path ``torch`` (:func:`torch_gated`): :func:`select`, then
:func:`attnzoo.kernels.block_sparse.selected_attention` (time ``O(density · N² · d)`` plus the gate's
``O(N·d + Nq·Nk·F)``). Fast path ``flex``: the same selection as a FlexAttention block mask. The output is one
softmax over the keys of the selected blocks, so the method returns its log-sum-exp (``return_lse=True``, from the
reference and ``torch``).

Decoding (:data:`DECODER`; ``query_block`` must be 1, the form in which a decoded token is a query block of its own,
as SeerAttention's decode gate scores each new token): :func:`decode_prefill` runs the torch path over the prompt and
keeps a :class:`~attnzoo.kv.cache.KVCache`; :func:`decode_step` appends one token, pools the cached keys of every
block by position (the token's own block over its cached keys so far) and selects over the cache with the same gate
and rule: exactly the causal forward's rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kernels.selection import BlockSelection, allowed_blocks, block_means
from attnzoo.kv.attend import position_block_pool, selected_slots, softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.methods.sparse.block_sparse import flex_block_mask
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

DEFAULT_BLOCK = 64  # SeerAttention's gate block size
KEY_POOLS = 3  # max, min, mean of each key block, concatenated (the paper's default gate, Qavg_Kmaxminavg)
TARGET_CHUNK = 1 << 22  # attention probabilities per chunk of gate_target (elements)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_kv_blocks(call: Call) -> int:
    return _cdiv(call.seq_kv, call.params.get("block_size", DEFAULT_BLOCK))


def _check_top_k(value: int, call: Call) -> str | None:
    nk = _num_kv_blocks(call)
    if call.decoding or value <= nk:
        return None
    return f"at most the number of key blocks, {nk} (⌈{call.seq_kv} / block_size⌉)"


def _check_gate(which: str) -> Any:
    def check(value: torch.Tensor, call: Call) -> str | None:
        heads, width, other = ((call.heads, call.head_dim, "k_gate") if which == "q_gate"
                               else (call.kv_heads, KEY_POOLS * call.head_dim, "q_gate"))
        if value.dim() != 3 or tuple(value.shape[:2]) != (heads, width):
            return f"a tensor of shape ({heads}, {width}, F)"
        partner = call.params.get(other)
        if partner is None:
            return f"given together with {other} (both None: the training-free gate)"
        if isinstance(partner, torch.Tensor) and partner.dim() == 3 and partner.shape[-1] != value.shape[-1]:
            return f"the same output width F as {other} ({partner.shape[-1]})"
        return None

    return check


def identity_q_gate(info: LayerInfo) -> torch.Tensor:
    """``(H, D, D)``: the identity, the query half of the gate that equals the training-free default."""
    return torch.eye(info.head_dim).expand(info.heads, -1, -1).clone()


def identity_k_gate(info: LayerInfo) -> torch.Tensor:
    """``(Hkv, 3D, D)``: ``[0; 0; I]`` (only the mean-pooled key), the key half of the training-free default."""
    d = info.head_dim
    w = torch.zeros(info.kv_heads, KEY_POOLS * d, d)
    w[:, (KEY_POOLS - 1) * d :] = torch.eye(d)
    return w


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    def pick(options: tuple[Any, ...]) -> Any:
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    block = int(torch.randint(1, 9, (), generator=gen))
    out: dict[str, Any] = {"block_size": block, "query_block": pick((None, 1, 2, 5))}
    if pick((True, False)):
        out["top_k"] = int(torch.randint(1, _cdiv(call.seq_kv, block) + 1, (), generator=gen))
    else:
        out["threshold"] = pick((0.0, 0.05, 0.2))
    if pick((True, False)):
        info = LayerInfo(call.heads, call.kv_heads, call.head_dim, {})
        out["q_gate"] = identity_q_gate(info) + 0.3 * torch.randn(call.heads, call.head_dim, call.head_dim,
                                                                  generator=gen)
        out["k_gate"] = identity_k_gate(info) + 0.3 * torch.randn(
            call.kv_heads, KEY_POOLS * call.head_dim, call.head_dim, generator=gen)
        out["q_gate"], out["k_gate"] = (t.to(call.device, call.dtype) for t in (out["q_gate"], out["k_gate"]))
    return out


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of 64 (Seer's), smaller on short sequences (at least 16 blocks), query blocks of the same size, and the
    top-k rule: ``fraction`` of the key blocks (of half of them when causal, the average a query may see)."""
    block = max(1, min(DEFAULT_BLOCK, call.seq_kv // 16))
    nk = _cdiv(call.seq_kv, block)
    top_k = max(1, min(nk, round(fraction * nk / (2 if call.causal else 1))))
    return {"block_size": block, "query_block": block, "top_k": top_k}


SPEC = MethodSpec(
    name="seer",
    family="sparse",
    mechanism="D6",
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
    arxiv="2410.13276",
    summary="a gate on pooled Q (mean) and K (max, min, mean), learnable or training-free, picks key blocks by "
            "threshold or top-k; exact softmax over them",
    exact=False,
    patterns=frozenset({"self/noncausal", "self/causal", "cross/noncausal", "cross/causal"}),
    params=(
        Param("block_size", (int,), DEFAULT_BLOCK, "keys per block (the last block may be partial)", low=1),
        Param("query_block", (int,), None, "queries pooled per gate row (None: block_size; 1 when decoding)",
              low=1),
        Param("top_k", (int,), None, "key blocks per query block (None: the threshold rule)", low=1,
              check=_check_top_k),
        Param("threshold", (float,), 2e-3, "keep the blocks whose gate probability exceeds it (when top_k is None)",
              low=0.0, high=1.0),
        Param("q_gate", (torch.Tensor,), None, "(H, D, F) gate projection of the mean-pooled queries; None with "
              "k_gate: the training-free gate", check=_check_gate("q_gate"), init=identity_q_gate),
        Param("k_gate", (torch.Tensor,), None, "(Hkv, 3·D, F) gate projection of the [max; min; mean]-pooled keys",
              check=_check_gate("k_gate"), init=identity_k_gate),
    ),
    complexity="O(density·N²·d + N·d + Nq·Nk·F) time, O(N·d + Nq·Nk) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, decoding_params=lambda call, params, prompt: {"query_block": 1}),
    at_density=at_density,
    lse=True,
)


# -- the gate ---------------------------------------------------------------------------------------------------------
def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_pool(x: torch.Tensor, block: int, how: str) -> torch.Tensor:
    """``x (B, H, S, D)`` pooled over blocks of ``block`` rows by ``how`` (``max``/``min``); the ragged last block
    over its real rows."""
    b, h, s, d = x.shape
    n = _cdiv(s, block)
    fill = float("-inf") if how == "max" else float("inf")
    blocks = torch.nn.functional.pad(x, (0, 0, 0, n * block - s), value=fill).reshape(b, h, n, block, d)
    return blocks.amax(dim=3) if how == "max" else blocks.amin(dim=3)


def _key_pools(k: torch.Tensor, block: int, learned: bool) -> torch.Tensor:
    """Each key block's features: ``[max; min; mean]`` (learned gate) or its mean (training-free)."""
    mean = block_means(k, block)
    return torch.cat([_block_pool(k, block, "max"), _block_pool(k, block, "min"), mean], -1) if learned else mean


def _prefix_key_pools(k: torch.Tensor, last: torch.Tensor, block: int, learned: bool) -> torch.Tensor:
    """``(B, Hkv, P, ·)``: the features of the keys from the start of key ``last[p]``'s block to ``last[p]`` itself
    (the visible prefix of the block a causal query block ends in)."""
    b, h, s, d = k.shape
    n = _cdiv(s, block)
    blocks = torch.nn.functional.pad(k, (0, 0, 0, n * block - s)).reshape(b, h, n, block, d)
    count = (last % block + 1).to(k.dtype).view(1, 1, -1, 1)
    mean = blocks.cumsum(dim=3).view(b, h, n * block, d)[:, :, last] / count
    if not learned:
        return mean
    high = blocks.cummax(dim=3).values.view(b, h, n * block, d)[:, :, last]
    low = blocks.cummin(dim=3).values.view(b, h, n * block, d)[:, :, last]
    return torch.cat([high, low, mean], -1)


def _project(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``x (B, Hx, n, ·) @ weight[h]`` per head (identity when None)."""
    return x if weight is None else torch.einsum("bhnc,hcf->bhnf", x, weight.to(x.dtype))


def gate_logits(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, causal: bool, scale: float, query_block: int | None = None,
    q_gate: torch.Tensor | None = None, k_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate ``G (B, H, Nq, Nk)`` of the module docstring (float32, float64 for float64 inputs), ``-inf`` at the
    key blocks a causal query block may not select. Differentiable in ``q_gate``/``k_gate`` (and q, k)."""
    bq = block_size if query_block is None else query_block
    learned = q_gate is not None
    acc = _gate_dtype(q)
    q, k = q.to(acc), k.to(acc)
    sq, skv, h, hkv = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    qf = _project(block_means(q, bq), q_gate)  # (B, H, Nq, F)
    kf = _project(_key_pools(k, block_size, learned), k_gate)  # (B, Hkv, Nk, F)
    gate_scale = 1.0 / math.sqrt(qf.shape[-1]) if learned else scale
    logits = grouped_logits(qf, kf, gate_scale)
    if not causal:
        return logits
    nq = qf.shape[2]
    last = (torch.arange(1, nq + 1, device=q.device) * bq).clamp(max=sq) - 1 + skv - sq  # each block's last key seen
    sees = last >= 0
    last = last.clamp(min=0)
    # the block holding that key, pooled over its visible prefix only
    own_kf = _project(_prefix_key_pools(k, last, block_size, learned), k_gate).repeat_interleave(h // hkv, dim=1)
    own = (qf * own_kf).sum(-1) * gate_scale  # (B, H, Nq)
    logits = logits.scatter(3, (last // block_size).view(1, 1, nq, 1).expand(*logits.shape[:3], 1), own.unsqueeze(-1))
    allowed = allowed_blocks(causal=True, seq_q=sq, seq_kv=skv, block_q=bq, block_k=block_size, device=q.device)
    return logits.masked_fill(~(allowed & sees.unsqueeze(1)), float("-inf"))


def choose(logits: torch.Tensor, *, top_k: int | None, threshold: float) -> torch.Tensor:
    """SeerAttention's rules on gate logits ``(B, H, T, Nk)`` (``-inf``: not allowed): ``(B, H, T, K)`` int64 key block
    indices, ``-1`` unused. ``top_k``: the ``top_k`` largest allowed (fewer where fewer are allowed; ties by
    ``torch.topk``); None: the allowed blocks with ``softmax(logits) > threshold``."""
    if top_k is not None:
        values, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        return idx.masked_fill(values == float("-inf"), -1)
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows allowed nothing: no block
    keep = p > threshold
    values, idx = p.masked_fill(~keep, -1.0).topk(max(1, int(keep.sum(-1).max())), dim=-1)
    return idx.masked_fill(values < 0, -1)


def select(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, block_size: int = DEFAULT_BLOCK,
    query_block: int | None = None, top_k: int | None = None, threshold: float = 2e-3,
    q_gate: torch.Tensor | None = None, k_gate: torch.Tensor | None = None,
) -> BlockSelection:
    """The key blocks each query block sees: a :class:`BlockSelection` with ``block_q = query_block or block_size``,
    ``block_k = block_size``, one selection per query head. No gradient flows through it."""
    with torch.no_grad():
        logits = gate_logits(q, k, block_size=block_size, causal=causal, scale=scale, query_block=query_block,
                             q_gate=q_gate, k_gate=k_gate)
    indices = choose(logits, top_k=top_k, threshold=threshold)
    bq = block_size if query_block is None else query_block
    return BlockSelection(indices, bq, block_size, q.shape[2], k.shape[2])


# -- attention --------------------------------------------------------------------------------------------------------
def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    seen = select(q, k, causal=causal, scale=scale, **params).dense(q.shape[1]) & visible(causal, None, q, k)
    return masked_attention(q, k, v, seen, scale, None, None, return_lse)


def torch_gated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    selection = select(q, k, causal=causal, scale=scale, **params)
    return selected_attention(q, k, v, selection, scale=scale, causal=causal, return_lse=return_lse)


def flex_gated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    selection = select(q, k, causal=causal, scale=scale, **params)
    return flex_block_mask(q, k, v, causal=causal, scale=scale, mask=None, bias=None, selection=selection,
                           return_lse=return_lse)


# -- decoding ---------------------------------------------------------------------------------------------------------
def _cache_key_pools(cache: KVCache, block_size: int, learned: bool) -> torch.Tensor:
    """``(B, Hkv, Nk, ·)``: the features of the cached keys of each block of ``block_size`` positions."""
    dtype = _gate_dtype(cache.keys)
    mean = position_block_pool(cache, block_size, dtype=dtype)
    if not learned:
        return mean
    return torch.cat([position_block_pool(cache, block_size, "amax", dtype),
                      position_block_pool(cache, block_size, "amin", dtype), mean], -1)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, lengths: torch.Tensor | None = None,
    **params: Any,
) -> tuple[torch.Tensor, KVCache]:
    """Causal SeerAttention over a (right-padded) prompt and the cache of its keys and values."""
    if (params["block_size"] if params["query_block"] is None else params["query_block"]) != 1:
        raise fail("query_block", "1 when decoding (a decoded token is its own query block: it cannot pool the "
                   "queries after it)", repr(params["query_block"]))
    out = torch_gated(q, k, v, causal=True, scale=scale, mask=None, bias=None, **params)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int,
    query_block: int | None, top_k: int | None, threshold: float, q_gate: torch.Tensor | None,
    k_gate: torch.Tensor | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append it, gate it against the cache's pooled key blocks, attend over its blocks."""
    cache = cache.append(k, v)
    learned = q_gate is not None
    qf = _project(q.to(_gate_dtype(q)), q_gate)  # a query block of one token: its mean is itself
    kf = _project(_cache_key_pools(cache, block_size, learned), k_gate)
    logits = grouped_logits(qf, kf, 1.0 / math.sqrt(qf.shape[-1]) if learned else scale)  # (B, H, 1, Nk)
    own = cache.query_positions(1).long().div(block_size, rounding_mode="floor")  # (B, 1, 1, 1)
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=q.device) > own, float("-inf"))
    chosen = choose(logits, top_k=top_k, threshold=threshold)
    return softmax_attention(cache, q, scale, selected_slots(cache, chosen, block_size)), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)


# -- distillation -----------------------------------------------------------------------------------------------------
def gate_target(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, causal: bool, scale: float | None = None,
    query_block: int | None = None, pool: str = "max",
) -> torch.Tensor:
    """The paper's gate training target ``(B, H, Nq, Nk)``: full softmax attention (causal or not) pooled over each
    (query block, key block) by ``max`` (the paper's 2-D max pooling) or ``sum`` (the block's attention mass), then
    each row normalised to sum to 1 (rows of queries that see no key are 0). Computed a few query blocks at a time:
    ``O(chunk · Skv)`` memory, never the ``Sq × Skv`` map at once. No gradient."""
    if pool not in ("max", "sum"):
        raise fail("pool", "'max' or 'sum'", repr(pool))
    for name, value in (("block_size", block_size), ("query_block", query_block)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise fail(name, "a positive int", repr(value))
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    bq, bk = block_size if query_block is None else query_block, block_size
    nq, nk = _cdiv(sq, bq), _cdiv(skv, bk)
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    acc = _gate_dtype(q)
    q, k = q.detach().to(acc), k.detach().to(acc)
    out = torch.zeros(b, h, nq, nk, dtype=acc, device=q.device)
    step = max(1, TARGET_CHUNK // max(1, b * h * bq * nk * bk))  # query blocks per chunk
    keys = torch.arange(skv, device=q.device)
    for a in range(0, nq, step):
        stop = min(a + step, nq)
        rows = torch.arange(a * bq, min(stop * bq, sq), device=q.device)
        s = grouped_logits(q[:, :, rows], k, scale_)  # (B, H, r, Skv)
        if causal:
            s = s.masked_fill(keys > (rows + skv - sq).unsqueeze(1), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
        # zero padding is neutral for both poolings (probabilities are >= 0)
        p = torch.nn.functional.pad(p, (0, nk * bk - skv, 0, (stop - a) * bq - rows.numel()))
        p = p.view(b, h, stop - a, bq, nk, bk)
        out[:, :, a:stop] = p.amax(dim=(3, 5)) if pool == "max" else p.sum(dim=(3, 5))
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)


def gate_loss(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, causal: bool, scale: float | None = None,
    query_block: int | None = None, q_gate: torch.Tensor | None = None, k_gate: torch.Tensor | None = None,
    target: torch.Tensor | None = None, pool: str = "max",
) -> torch.Tensor:
    """The distillation loss: the mean over gate rows (that may select a block) of ``KL(target ‖ softmax(G))``, the
    paper's ``KLDivLoss(log_softmax(G), target)`` up to its element-count normalisation. ``target``: from
    :func:`gate_target` (computed here when None). Scalar, differentiable in ``q_gate``/``k_gate``."""
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if target is None:
        target = gate_target(q, k, block_size=block_size, causal=causal, scale=scale_, query_block=query_block,
                             pool=pool)
    logits = gate_logits(q, k, block_size=block_size, causal=causal, scale=scale_, query_block=query_block,
                         q_gate=q_gate, k_gate=k_gate)
    if target.shape != logits.shape:
        raise fail("target", f"a tensor of shape {tuple(logits.shape)}", f"shape {tuple(target.shape)}")
    target = target.to(logits.dtype)
    rows = torch.isfinite(logits).any(-1)
    log_p = torch.log_softmax(logits.masked_fill(~rows.unsqueeze(-1), 0.0), dim=-1)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_p), torch.zeros_like(log_p))
    return terms.sum(-1)[rows].mean()


def distill_gate(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = DEFAULT_BLOCK, causal: bool = True,
    scale: float | None = None, query_block: int | None = None, steps: int = 200, lr: float = 1e-2,
    init: dict[str, torch.Tensor] | None = None, pool: str = "max",
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit ``q_gate``/``k_gate`` on samples ``q (B, H, N, D)``, ``k (B, Hkv, N', D)`` (the model frozen): Adam on
    :func:`gate_loss` for ``steps`` steps from ``init`` (default: the identity gates, i.e. the training-free gate).
    Returns the fitted ``{q_gate, k_gate}`` (detached, ready for ``attnzoo.attention`` or an ``nn`` layer) and the loss
    before each step and after the last."""
    q, k = q.detach(), k.detach()
    info = LayerInfo(q.shape[1], k.shape[1], q.shape[-1], {})
    start = init or {"q_gate": identity_q_gate(info), "k_gate": identity_k_gate(info)}
    gates = {name: t.detach().to(q.device, _gate_dtype(q)).clone().requires_grad_(True) for name, t in start.items()}
    target = gate_target(q, k, block_size=block_size, causal=causal, scale=scale, query_block=query_block, pool=pool)
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    history = []
    for i in range(steps + 1):
        loss = gate_loss(q, k, block_size=block_size, causal=causal, scale=scale, query_block=query_block,
                         target=target, **gates)
        history.append(float(loss.detach()))
        if i == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {name: t.detach() for name, t in gates.items()}, history


register(SPEC, reference, [Backend("torch", torch_gated, lse=True),
                           Backend("flex", flex_gated, flex.unavailable_masked, lse=True)],
         DECODER)
