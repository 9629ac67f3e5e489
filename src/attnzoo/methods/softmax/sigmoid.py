"""S2 — sigmoid attention.

Paper: "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., arXiv:2409.04431).

Formula as implemented: ``O = (σ(scale · Q Kᵀ + bias + b) ⊙ M) V`` with ``M`` the 0/1 visibility (user mask,
bottom-right causal) and no row normalisation. ``b = sigmoid_bias`` defaults to ``−log(seq_kv)``, the paper's choice
that keeps the initial attention norm near that of softmax attention. A row with no visible key gives 0.

Layer: ``attnzoo.nn.Attention(..., method="sigmoid")`` builds the paper's recommended layer around this kernel
(:mod:`attnzoo.nn.layers.sigmoid`: QK-norm on the heads and the hybrid-norm LayerNorm on the layer's output, with
this kernel's ``−log n`` bias); ``faithful=False`` gives the bare kernel.

Fast path ``torch`` (:func:`torch_tiled`, the autograd function :class:`_SigmoidTiles`): since rows are not
normalised, any split of the work simply adds up, so the scores are computed tile by tile, never all at once. On CPU a
tile is one key/value head of one batch row (the
query heads of its GQA group stacked as rows: no K/V copies) × ``r`` query rows × at most ``KEYS_PER_TILE`` keys,
with ``r`` chosen so the tile's scores fill ``SCORES_PER_TILE`` = 2²¹ elements (8 MiB in fp32: the tile stays in
cache between its three passes); small calls put several heads in one tile. Other devices use few large tiles
(``GPU_SCORES_PER_TILE``, whole key rows), as each op is a kernel launch there. Per tile: one ``baddbmm`` writes
``scale·q kᵀ + b`` (the scale is folded into q once, b is the matmul's added term) into a scores buffer allocated
once per call, the user bias and masks are applied in place, ``sigmoid_`` runs in place, and one ``bmm``
accumulates ``σ V`` into the row block's output in place. Causal calls skip the key chunks past each row block's
last visible key (row blocks are at most ``Sq / CAUSAL_BLOCKS`` rows, so the skipped triangle is most of the upper
half).

Memory does not depend on the allocator: nothing score-sized is allocated per tile and nothing a tile allocates
outlives it. (The former query-block path allocated each block's scores afresh and kept the block's small result
after it; glibc's heap did not reuse the freed blocks and grew to the full N×N matrix: 8.1 GiB at H=8, N=16384.)

Backward: a hand-written ``autograd.Function`` recomputes each tile's weights ``p`` into the same kind of buffer and
accumulates ``dV += pᵀ dO``, ``dS = (dO Vᵀ) ⊙ p(1 − p)`` (masked entries have p = 0, so their dS is 0), ``dK += dSᵀ
q``, ``dQ += dS K`` and, if the bias needs one, its gradient (summed over its broadcast axes). Training memory is
O(tile) beyond the inputs and their gradients, on any device.

Measured (2-core AMD EPYC, torch 2.13 CPU, 2 threads, fp32, B=1, D=64, no grad, each case in a fresh process: time
of the call, best of several, divided by that of ``scaled_dot_product_attention`` on the same inputs in the same
rounds; peak ``ru_maxrss`` above the inputs): H=8, N=16384: 0.97–1.14× SDPA per round over two runs of three
rounds, the first call alike, peak 0.081 GiB (SDPA 0.037; the former path 1.64× warm, 3.7× on the first call, 8.1
GiB); causal 1.16–1.20× causal SDPA; GQA H=8/Hkv=2 0.99–1.12×; H=4 0.94–1.11×. SDPA's CPU kernel is a fused flash
kernel; this path keeps up because the two matmuls and the sigmoid cost what the fused kernel costs once no score
tile leaves the cache. The ratio grows on a loaded machine (each of the many small ops ends in a thread barrier;
1.3× was seen at such a moment). FlexAttention is not a faster route on CPU: its compiled kernel took ~1.75× SDPA's
time here even without a score modifier, and CPU flex cannot return the log-sum-exp that the
``σ(s) = exp(s − softplus(s))`` rewrite needs.

Decoding (:data:`DECODER`): the default ``b = −log(seq_kv)`` depends on the length the sequence will finally have,
which a decoder does not know, so decoding requires an explicit ``sigmoid_bias`` (``attnzoo.prefill(...,
sigmoid_bias=-math.log(N))`` reproduces the forward over ``N`` tokens) and refuses ``None`` naming it.
:func:`decode_prefill` runs the tiled causal path over the prompt and keeps its keys and values in a
:class:`~attnzoo.kv.cache.KVCache`; :func:`decode_step` appends the token and sums ``σ(scale·q·k_j + b) v_j`` over the
slots at or before it (a slot that stands for ``n`` merged tokens, ``log_weight = log n``, counts ``n`` times).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Decoder, MethodSpec, Param, TestHints, register

SCORES_PER_TILE = 1 << 21  # CPU: 8 MiB of fp32 scores per tile, which stays in cache between its three passes
KEYS_PER_TILE = 4096  # CPU: a tile spans at most this many keys; longer rows are cut into key chunks
GPU_SCORES_PER_TILE = 1 << 26  # other devices: few large tiles (whole key rows), since every op is a kernel launch
CAUSAL_BLOCKS = 16  # causal calls use at least this many row blocks, so the skipped upper triangle is large

SPEC = MethodSpec(
    name="sigmoid",
    family="softmax",
    mechanism="S2",
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    arxiv="2409.04431",
    summary="σ(QKᵀ·scale + b)V with no row normalisation; b = −log(seq_kv) by default",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("sigmoid_bias", (float,), None, "the scalar b added to every logit; None means −log(seq_kv)"),
    ),
    complexity="O(N²d) time, O(N·r) memory (query blocks of r rows)",
    subquadratic_memory=True,
    tests=TestHints(decoding_params=lambda call, params, prompt: {"sigmoid_bias": -math.log(call.seq_kv)}),
)


def _bias_value(sigmoid_bias: float | None, seq_kv: int) -> float:
    return -math.log(seq_kv) if sigmoid_bias is None else float(sigmoid_bias)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, sigmoid_bias: float | None,
) -> torch.Tensor:
    s = dense_scores(q, k, scale) + _bias_value(sigmoid_bias, k.shape[2])
    if bias is not None:
        s = s + bias
    w = torch.sigmoid(s) * visible(causal, mask, q, k)
    return w @ repeat_kv(v, q.shape[1])


@dataclass(frozen=True)
class _Plan:
    """How one call is cut into tiles, and what every tile applies to its scores.

    A tile is ``heads`` key/value heads of one batch row (their ``group`` query heads stacked as rows) × ``rows``
    query rows × up to ``keys`` keys; its scores ``(heads, group·rows, keys)`` fill at most ``SCORES_PER_TILE``
    elements. The tiles of one row block are visited in key order, so the block's output accumulates in place.
    """

    batch: int
    kv_heads: int
    group: int
    seq_q: int
    seq_kv: int
    heads: int  # key/value heads per tile
    rows: int  # query rows per tile
    keys: int  # keys per tile
    offset: float  # the sigmoid bias b
    causal: bool
    mask: torch.Tensor | None
    bias: torch.Tensor | None

    def row_blocks(self) -> Iterator[tuple[int, int, int, int, int]]:
        """``(batch row, first kv head, last kv head + 1, first query row, last query row + 1)`` of every row block."""
        for b in range(self.batch):
            for h0 in range(0, self.kv_heads, self.heads):
                for start in range(0, self.seq_q, self.rows):
                    yield b, h0, min(self.kv_heads, h0 + self.heads), start, min(self.seq_q, start + self.rows)

    def key_chunks(self, end: int) -> Iterator[tuple[int, int]]:
        """``[j0, j1)`` key ranges that rows before ``end`` can see: causally none past ``end − 1 + Skv − Sq``."""
        seen = max(0, min(self.seq_kv, end + self.seq_kv - self.seq_q)) if self.causal else self.seq_kv
        for j0 in range(0, seen, self.keys):
            yield j0, min(seen, j0 + self.keys)


def _plan(q: torch.Tensor, k: torch.Tensor, causal: bool, mask: torch.Tensor | None, bias: torch.Tensor | None,
          offset: float) -> _Plan:
    b, h, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = h // hkv
    cpu = q.device.type == "cpu"
    budget = SCORES_PER_TILE if cpu else GPU_SCORES_PER_TILE
    keys = min(skv, KEYS_PER_TILE) if cpu else skv
    rows = max(16, min(sq, budget // (g * keys)))
    if causal:
        rows = min(rows, max(16, -(-sq // CAUSAL_BLOCKS)))
    heads = max(1, min(hkv, budget // (g * rows * keys)))  # small calls batch several heads per tile
    return _Plan(b, hkv, g, sq, skv, heads, rows, keys, offset, causal, mask, bias)


Tile = tuple[int, int, int, int, int, int, int]  # batch row, kv heads [h0, h1), query rows [start, end), keys [j0, j1)


def _tile_of(t: torch.Tensor, plan: _Plan, tile: Tile) -> torch.Tensor:
    """A 4-D mask or bias (or its gradient) at one tile: broadcastable to ``(heads·group, rows, keys)``."""
    b, h0, h1, start, end, j0, j1 = tile
    t = t[b if t.shape[0] > 1 else 0]
    t = t[h0 * plan.group : h1 * plan.group] if t.shape[0] > 1 else t
    t = t[:, start:end] if t.shape[1] > 1 else t
    return t[..., j0:j1] if t.shape[2] > 1 else t


def _weights(qf: torch.Tensor, kf: torch.Tensor, plan: _Plan, tile: Tile, offset: torch.Tensor,
             buffer: torch.Tensor) -> torch.Tensor:
    """``σ(q kᵀ + b + bias)`` of one tile, masked entries 0, written into ``buffer``: ``(heads, group·rows, keys)``.

    ``qf (B·Hkv, G, Sq, D)`` holds the already scaled queries, ``kf (B·Hkv, Skv, D)`` the keys, ``offset`` is b as a
    0-d tensor (the matmul adds it while writing the scores).
    """
    b, h0, h1, start, end, j0, j1 = tile
    heads = slice(b * plan.kv_heads + h0, b * plan.kv_heads + h1)
    q_rows = qf[heads, :, start:end].reshape(h1 - h0, -1, qf.shape[-1])
    s = buffer[: q_rows.shape[0] * q_rows.shape[1] * (j1 - j0)].view(q_rows.shape[0], q_rows.shape[1], j1 - j0)
    torch.baddbmm(offset, q_rows, kf[heads, j0:j1].transpose(1, 2), out=s)
    by_head = s.view((h1 - h0) * plan.group, end - start, j1 - j0)
    if plan.bias is not None:
        by_head.add_(_tile_of(plan.bias, plan, tile))
    if plan.mask is not None:
        by_head.masked_fill_(_tile_of(plan.mask, plan, tile).logical_not(), float("-inf"))
    shift = plan.seq_kv - plan.seq_q  # causal: row i sees keys j <= i + shift
    diagonal = max(j0, start + shift + 1)  # keys from here on are hidden from some row of the tile
    if plan.causal and diagonal < j1:
        row = torch.arange(start + shift, end + shift, device=s.device).view(-1, 1)
        hidden = torch.arange(diagonal, j1, device=s.device) > row
        by_head[..., diagonal - j0 :].masked_fill_(hidden, float("-inf"))
    return s.sigmoid_()


class _SigmoidTiles(torch.autograd.Function):
    """Sigmoid attention tile by tile with one reused scores buffer; the backward recomputes each tile's weights.

    Nothing score-sized is allocated per tile, forward or backward, and nothing a tile allocates outlives it, so the
    peak does not depend on how the memory allocator reuses freed blocks (glibc's heap, handed a fresh score block
    per query block with the block's small result kept after it, once grew to the whole score matrix). Inputs: scaled
    ``q (B, H, Sq, D)``, ``k``, ``v``, the user's ``bias`` (or None) and the :class:`_Plan`.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                plan: _Plan) -> torch.Tensor:
        g, dv = plan.group, v.shape[-1]
        qf, kf, vf = _flat(q, k, v, plan)
        out = q.new_zeros(plan.batch * plan.kv_heads, g, plan.seq_q, dv)
        buffer = q.new_empty(plan.heads * g * plan.rows * plan.keys)
        rows_out = q.new_empty(plan.heads * g * plan.rows * dv)
        offset = q.new_tensor(plan.offset)
        for b, h0, h1, start, end in plan.row_blocks():
            heads = slice(b * plan.kv_heads + h0, b * plan.kv_heads + h1)
            acc = rows_out[: (h1 - h0) * g * (end - start) * dv].view(h1 - h0, g * (end - start), dv)
            chunks = list(plan.key_chunks(end))
            for j0, j1 in chunks:
                p = _weights(qf, kf, plan, (b, h0, h1, start, end, j0, j1), offset, buffer)
                if j0 == 0:
                    torch.bmm(p, vf[heads, j0:j1], out=acc)
                else:
                    acc.baddbmm_(p, vf[heads, j0:j1])
            if chunks:  # causal rows that see no key stay 0
                out[heads, :, start:end] = acc.view(h1 - h0, g, end - start, dv)
        ctx.save_for_backward(q, k, v, bias)
        ctx.plan = plan
        return out.view(plan.batch, plan.kv_heads * g, plan.seq_q, dv)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias = ctx.saved_tensors
        plan: _Plan = ctx.plan
        g, d, dv = plan.group, q.shape[-1], v.shape[-1]
        qf, kf, vf = _flat(q, k, v, plan)
        grad_rows = grad_out.reshape(plan.batch * plan.kv_heads, g, plan.seq_q, dv)
        dq, dk, dv_ = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        dbias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        buffer = q.new_empty(plan.heads * g * plan.rows * plan.keys)
        grad_scores = torch.empty_like(buffer)
        rows_grad = q.new_empty(plan.heads * g * plan.rows * d)
        offset = q.new_tensor(plan.offset)
        for b, h0, h1, start, end in plan.row_blocks():
            heads = slice(b * plan.kv_heads + h0, b * plan.kv_heads + h1)
            do = grad_rows[heads, :, start:end].reshape(h1 - h0, -1, dv)
            q_rows = qf[heads, :, start:end].reshape(h1 - h0, -1, d)
            acc = rows_grad[: q_rows.numel()].view(q_rows.shape)
            chunks = list(plan.key_chunks(end))
            for j0, j1 in chunks:
                tile = (b, h0, h1, start, end, j0, j1)
                p = _weights(qf, kf, plan, tile, offset, buffer)
                dv_[heads, j0:j1].baddbmm_(p.transpose(1, 2), do)
                ds = torch.bmm(do, vf[heads, j0:j1].transpose(1, 2), out=grad_scores[: p.numel()].view(p.shape))
                torch.ops.aten.sigmoid_backward.grad_input(ds, p, grad_input=ds)  # ds ← dP · p · (1 − p), one pass
                if dbias is not None:
                    target = _tile_of(dbias, plan, tile)
                    target.add_(ds.view((h1 - h0) * g, end - start, j1 - j0).sum_to_size(target.shape))
                dk[heads, j0:j1].baddbmm_(ds.transpose(1, 2), q_rows)
                if j0 == 0:
                    torch.bmm(ds, kf[heads, j0:j1], out=acc)
                else:
                    acc.baddbmm_(ds, kf[heads, j0:j1])
            if chunks:
                dq[heads, :, start:end] = acc.view(h1 - h0, g, end - start, d)
        shape = plan.batch, plan.kv_heads, plan.seq_kv
        return dq.view(q.shape), dk.view(*shape, d), dv_.view(*shape, dv), dbias, None


def _flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (B·Hkv, G, Sq, D)``, ``k (B·Hkv, Skv, D)``, ``v (B·Hkv, Skv, Dv)``, contiguous."""
    n = plan.batch * plan.kv_heads
    return (q.contiguous().view(n, plan.group, plan.seq_q, q.shape[-1]), k.contiguous().view(n, plan.seq_kv, -1),
            v.contiguous().view(n, plan.seq_kv, -1))


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, sigmoid_bias: float | None,
) -> torch.Tensor:
    plan = _plan(q, k, causal, mask, bias, _bias_value(sigmoid_bias, k.shape[2]))
    out: torch.Tensor = _SigmoidTiles.apply(q * scale, k, v, bias, plan)
    return out


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, sigmoid_bias: float | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal sigmoid attention over a (right-padded) prompt and the cache of its keys and values."""
    if sigmoid_bias is None:
        raise fail("sigmoid_bias", "a float when decoding (the default −log(seq_kv) depends on the final length; "
                   "pass -math.log(N) to match a forward over N tokens)", None)
    out = torch_tiled(q, k, v, causal=True, scale=scale, mask=None, bias=None, sigmoid_bias=sigmoid_bias)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, sigmoid_bias: float,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append its key and value, sum ``σ(scale·q·k + b) v`` over the slots it sees."""
    cache = cache.append(k, v)
    heads = q.shape[1]
    w = torch.sigmoid(grouped_logits(q, cache.keys, scale) + sigmoid_bias)
    w = w * cache.visible_to(cache.query_positions(q.shape[2]), heads)
    counts = cache.slot_log_weights(heads)
    if counts is not None:
        w = w * counts.exp()
    return cache.combine(w), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_tiled)], DECODER)
