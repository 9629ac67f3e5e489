"""D11 — AdaSpa: per-head block-sparse masks from a precise online search over the exact attention weights, cached
log-sum-exp, reused across diffusion steps.

Paper: "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation" (Xia et al.,
arXiv:2502.21079). No public code was found; the rule below follows the paper's §4 (Eq. 13–14, Algorithms 1–2, the
head-adaptive hierarchy and the "Text Sink" / "Row Wise" implementation notes).

Formula as implemented. Cut queries and keys into blocks of ``block_size`` (last ones may be partial). The *block
mass* is the exact softmax weight each (query block ``p``, key block ``q``) pair carries (Eq. 13)::

    W_pq = Σ_{i ∈ p, j ∈ q, j visible to i} exp(scale · q_i·k_j − LSE_i),   LSE_i = log Σ_{j visible} exp(scale·q_i·k_j)

computed block row by block row (:func:`block_mass`): ``O(N²d)`` work, ``O(N)`` memory — never the ``N × N``
weights at once. ``LSE`` is the rows' log-sum-exp of full attention: computed by a first pass (:func:`log_sum_exp`,
Algorithm 1's "fused online search") or given (``lse=``, Algorithm 2's "LSE-cached search": the paper observes that
LSE barely moves across denoising steps, so the LSE of an earlier step halves the search). Search (:func:`search`):

- **Row-wise top-k** (Eq. 14 with the paper's "Row Wise" uniform selection): each query block keeps the
  ``max(1, round((1 − sparsity) · Nk))`` key blocks of largest mass (:func:`~attnzoo.kernels.selection.topk_blocks`;
  causal calls never pick future blocks).
- **Head-adaptive hierarchy**: each head's *Recall* at that sparsity, ``Σ selected W / Σ W``; with ``n`` the number
  of heads of recall above ``fine_recall`` (0.8, the paper's) — at most half the heads, so that the two groups are
  disjoint — the ``n`` heads of highest recall get sparsity ``(1 + s)/2`` and the ``n`` of lowest ``(3s − 1)/2``
  (clamped at 0), keeping the average. Heads are ranked per batch element (ties: head order).
- **Text sink** (``text_tokens``, the paper's implementation note): the last ``text_tokens`` tokens are text (the
  paper's sequence ``video ; text``, Eq. 1): every key block holding text keys and every query block holding text
  queries is fully kept (future blocks excluded when causal). 0 (the default) turns it off.
- Optional ``recall_target``: instead of the sparsity rule, each query block keeps the fewest key blocks whose mass
  reaches that share of its row's mass (:func:`~attnzoo.kernels.selection.threshold_blocks` on ``log W``); no head
  adaptation then. Not in the paper; for users who prefer a recall budget to a sparsity.

Then attention is exact softmax over the selected blocks (token-level causal mask inside them when causal)::

    O_i = softmax_{j ∈ S(p(i)), j visible} (scale · q_i·k_j) V

Reuse across steps — the paper's point: the mask is found once (at step ``t_w`` and a few key steps, ``T_s = {10,
30}`` of 50) and reused by the steps between. Here :func:`search` returns a
:class:`~attnzoo.kernels.selection.BlockSelection` to store and pass back as ``selection=`` (to this method, which
then skips the search, or to ``block_sparse``); :func:`log_sum_exp` gives the LSE to cache for the next search.

What the search costs: without ``lse``, two passes of ``QKᵀ`` and ``exp`` over all ``N²`` pairs; with a cached
``lse``, one. Always ``O(N²d)`` time and ``O(N·d + (N/block_size)²)`` memory (logits in bounded row chunks). On a CPU
(fp32, one thread, B=1, H=8, D=64, N=16384, noncausal) a search took about 1.3× SDPA's time with a cached LSE and
2.3× without. A call without ``selection`` therefore costs a search *plus* the sparse attention, more than dense
attention: the speed comes from the calls that reuse a stored selection, which cost ``O((1 − sparsity)·N²d)`` (there
3.7× faster than SDPA at sparsity 0.8, 7.3× at 0.9), as the paper's schedule does (two searches in 50 steps).

Defaults ``block_size=64, sparsity=0.8``: the paper's default configuration (HunyuanVideo and CogVideoX1.5, 720p).
Patterns: all four (the paper's DiTs are noncausal self-attention; causal and cross calls follow the same rule with
bottom-right causal visibility). No user mask or bias. Not a decoder: AdaSpa is for noncausal video diffusion, with
no token-by-token generation; a causal decode would also need the full LSE of every new row, i.e. dense attention.

Reference (:func:`reference`): the selection (given, or :func:`search` on the same inputs), expanded to a dense token
mask AND causal, then a dense masked softmax (:func:`attnzoo.methods.sparse.block_sparse.reference`). Fast path
``torch`` (:func:`torch_searched`): the same selection, then :func:`~attnzoo.kernels.block_sparse.
selected_attention`. ``flex`` (:func:`flex_searched`): FlexAttention with the selection's block mask. The output is
one softmax over the keys of the selected blocks, so the method returns its log-sum-exp (``return_lse=True``, from the
reference and ``torch``) — the same quantity ``lse=`` caches when it comes from full attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import flex
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kernels.selection import BlockSelection, allowed_blocks, threshold_blocks, topk_blocks
from attnzoo.methods.common import Output
from attnzoo.methods.sparse import block_sparse
from attnzoo.registry import ALL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register

LOGITS_ELEMENTS = 1 << 23
"""Logits a search pass holds at once (32 MiB of float32): the row chunks of :func:`block_mass` and
:func:`log_sum_exp` are sized to it, so their memory stays O(N) whatever N."""


def _check_selection(value: BlockSelection, call: Call) -> str | None:
    return value.mismatch(call.batch, call.heads, call.kv_heads, call.seq_q, call.seq_kv)


def _check_lse(value: torch.Tensor, call: Call) -> str | None:
    if tuple(value.shape) != (call.batch, call.heads, call.seq_q):
        return f"a (batch, heads, seq_q) = ({call.batch}, {call.heads}, {call.seq_q}) tensor of row log-sum-exps"
    return None


def _check_text(text_tokens: int, call: Call) -> str | None:
    if text_tokens > min(call.seq_q, call.seq_kv):
        return f"at most min(seq_q, seq_kv) = {min(call.seq_q, call.seq_kv)}"
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def draw(options: tuple[Any, ...]) -> Any:
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    params: dict[str, Any] = {"block_size": draw((1, 2, 3, 5, 8)), "head_adaptive": draw((False, True)),
                              "text_tokens": min(draw((0, 0, 1, 3)), call.seq_q, call.seq_kv)}
    if draw((False, True)):
        params["recall_target"] = draw((0.5, 0.9, 1.0))
    else:
        params["sparsity"] = draw((0.0, 0.5, 0.8))
    if draw((False, True)):  # a cached LSE (from another step: any values)
        params["lse"] = torch.randn(call.batch, call.heads, call.seq_q, generator=generator, dtype=torch.float64)
    return params


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of ``seq_kv / 32`` (at most the paper's 64, at least 1) and ``sparsity = 1 − fraction``: each query
    block keeps ``fraction`` of the key blocks on average over the heads (the head-adaptive hierarchy keeps the
    mean)."""
    return {"block_size": max(1, min(64, call.seq_kv // 32)), "sparsity": 1.0 - fraction}


SPEC = MethodSpec(
    name="adaspa",
    family="sparse",
    mechanism="D11",
    paper="Training-free and Adaptive Sparse Attention for Efficient Long Video Generation",
    arxiv="2502.21079",
    summary="per-head block masks from the exact block masses of full attention (LSE-cached search, row-wise top-k, "
            "head-adaptive sparsity), reusable across diffusion steps",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("block_size", (int,), 64, "tokens per query and key block (the last may be partial)", low=1),
        Param("sparsity", (float,), 0.8, "fraction of key blocks each query block skips (keeps max(1, round((1 − "
              "sparsity)·Nk)))", low=0.0, high=1.0),
        Param("head_adaptive", (bool,), True, "the paper's head-adaptive hierarchy: sparser heads of high recall, "
              "denser heads of low recall"),
        Param("fine_recall", (float,), 0.8, "a head whose recall exceeds this counts as fine (head adaptation)",
              low=0.0, low_open=True, high=1.0),
        Param("text_tokens", (int,), 0, "the last text_tokens tokens are text: their rows and columns are always "
              "kept (the paper's text sink)", low=0, check=_check_text),
        Param("recall_target", (float,), None, "instead of sparsity: per query block the fewest key blocks whose "
              "mass reaches this share", low=0.0, low_open=True, high=1.0),
        Param("lse", (torch.Tensor,), None, "cached row log-sum-exps (B, H, Sq) of full attention for the search "
              "(log_sum_exp); None: computed", check=_check_lse),
        Param("selection", (BlockSelection,), None, "a stored selection to reuse (from search); None: search",
              check=_check_selection),
    ),
    complexity="search O(N²d) time (one pass with a cached LSE, two without), O(N·d + (N/block_size)²) memory; "
               "attention O((1 − sparsity)·N²d)",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)


def _logit_rows(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, block_size: int
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, logits)`` for consecutive chunks of whole query blocks: ``logits (B, H, r, Skv)`` float32 from
    detached inputs, future keys at −inf when causal; each chunk within :data:`LOGITS_ELEMENTS`. Every chunk is a
    view of one buffer (fresh allocations per chunk cost page faults on CPU): use it before taking the next."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    qf, kf = q.detach().float().contiguous(), k.detach().float().contiguous()
    rows = block_size * max(1, LOGITS_ELEMENTS // max(1, b * h * block_size * skv))
    buffer = qf.new_empty(b * h * min(rows, sq) * skv)
    keys = torch.arange(skv, device=q.device)
    for start in range(0, sq, rows):
        logits = grouped_logits(qf[:, :, start : start + rows], kf, scale, buffer)
        if causal:
            last = torch.arange(start, start + logits.shape[2], device=q.device) + skv - sq
            logits.masked_fill_(keys > last.unsqueeze(1), float("-inf"))
        yield start, logits


def log_sum_exp(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, block_size: int = 64
                ) -> torch.Tensor:
    """The rows' log-sum-exp of full attention, ``(B, H, Sq)`` float32 (−inf for a row that sees no key): the LSE to
    cache for later searches (Algorithm 1's first pass). ``block_size`` only sets the chunking."""
    parts = [torch.logsumexp(logits, dim=-1)
             for _, logits in _logit_rows(q, k, causal=causal, scale=scale, block_size=block_size)]
    return torch.cat(parts, dim=2)


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float,
               block_size: int) -> torch.Tensor:
    """``W (B, H, Nq, Nk)`` float32: the softmax weight ``exp(scale·q·k − lse)`` summed over each (query block, key
    block) pair (Eq. 13), block row by block row (O(N) memory). With the exact LSE every row's mass sums to 1."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    nq, nk = -(-sq // block_size), -(-skv // block_size)
    rows_lse = lse.detach().float().masked_fill(lse == float("-inf"), float("inf"))  # rows seeing nothing: 0
    out = torch.empty(b, h, nq, nk, device=q.device)
    for start, logits in _logit_rows(q, k, causal=causal, scale=scale, block_size=block_size):
        r = logits.shape[2]
        p = logits.sub_(rows_lse[:, :, start : start + r, None]).exp_()
        blocks = -(-r // block_size)
        if blocks * block_size != r:  # a ragged last query block
            p = F.pad(p, (0, 0, 0, blocks * block_size - r))
        rows = F.pad(p.view(b, h, blocks, block_size, skv).sum(dim=3), (0, nk * block_size - skv))
        first = start // block_size
        out[:, :, first : first + blocks] = rows.view(b, h, blocks, nk, block_size).sum(dim=4)
    return out


def _head_counts(recall: torch.Tensor, base: int, sparsity: float, fine_recall: float, nk: int) -> torch.Tensor:
    """``(B, H)`` blocks per query block for each head: the paper's head-adaptive hierarchy from each head's
    ``recall (B, H)`` at the base count."""
    heads = recall.shape[1]
    n = (recall > fine_recall).sum(dim=1, keepdim=True).clamp(max=heads // 2)  # (B, 1)
    rank = recall.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0: the highest recall

    def keep(s: float) -> int:
        return min(nk, max(1, round((1.0 - s) * nk)))

    counts = torch.full_like(rank, base)
    counts = counts.masked_fill(rank < n, keep((1.0 + sparsity) / 2))
    return counts.masked_fill(rank >= heads - n, keep(max(0.0, (3.0 * sparsity - 1.0) / 2)))


def search(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
           block_size: int = 64, sparsity: float = 0.8, head_adaptive: bool = True, fine_recall: float = 0.8,
           text_tokens: int = 0, recall_target: float | None = None, lse: torch.Tensor | None = None
           ) -> BlockSelection:
    """AdaSpa's precise online search (module docstring): the per-head block selection of ``q (B, H, Sq, D)`` over
    ``k (B, Hkv, Skv, D)``, one selection per query head. ``lse``: a cached :func:`log_sum_exp` (else computed here,
    one more pass). Store the result and pass it as ``selection=`` to reuse it (this method or ``block_sparse``)."""
    sq, skv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if lse is None:
        lse = log_sum_exp(q, k, causal=causal, scale=scale, block_size=block_size)
    mass = block_mass(q, k, lse, causal=causal, scale=scale, block_size=block_size)
    nk = mass.shape[-1]
    sizes = {"causal": causal, "seq_q": sq, "seq_kv": skv, "block_q": block_size, "block_k": block_size}
    if recall_target is not None:
        blocks = threshold_blocks(mass.clamp(min=1e-30).log(), recall_target, **sizes).blocks()
    else:
        base = min(nk, max(1, round((1.0 - sparsity) * nk)))
        blocks = topk_blocks(mass, base, **sizes).blocks()
        if head_adaptive and q.shape[1] > 1:
            recall = (mass * blocks).sum(dim=(2, 3)) / mass.sum(dim=(2, 3)).clamp(min=1e-30)
            counts = _head_counts(recall, base, sparsity, fine_recall, nk)
            for count in counts.unique().tolist():
                if count != base:
                    chosen = (counts == count)[..., None, None]
                    blocks = torch.where(chosen, topk_blocks(mass, count, **sizes).blocks(), blocks)
    if text_tokens > 0:
        text_keys = torch.arange(nk, device=q.device) >= (skv - text_tokens) // block_size
        text_rows = torch.arange(mass.shape[2], device=q.device) >= (sq - text_tokens) // block_size
        blocks = blocks | text_keys | text_rows.unsqueeze(1)
        allowed = allowed_blocks(device=q.device, **sizes)
        blocks = blocks if allowed is None else blocks & allowed
    return BlockSelection.from_blocks(blocks, block_q=block_size, block_k=block_size, seq_q=sq, seq_kv=skv)


def _selection(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, selection: BlockSelection | None,
               **params: Any) -> BlockSelection:
    return search(q, k, causal=causal, scale=scale, **params) if selection is None else selection


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              mask: torch.Tensor | None, bias: torch.Tensor | None, selection: BlockSelection | None,
              return_lse: bool = False, **params: Any) -> Output:
    """Dense masked softmax over the blocks of the given or searched selection (``params``: :func:`search`'s)."""
    chosen = _selection(q, k, causal, scale, selection, **params)
    return block_sparse.reference(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias, selection=chosen,
                                  return_lse=return_lse)


def torch_searched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                   mask: torch.Tensor | None, bias: torch.Tensor | None, selection: BlockSelection | None,
                   return_lse: bool = False, **params: Any) -> Output:
    """The given or searched selection, then the shared block-sparse kernel."""
    chosen = _selection(q, k, causal, scale, selection, **params)
    return block_sparse.torch_gathered(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias, selection=chosen,
                                       return_lse=return_lse)


def flex_searched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  mask: torch.Tensor | None, bias: torch.Tensor | None, selection: BlockSelection | None,
                  return_lse: bool = False, **params: Any) -> Output:
    """The given or searched selection, then FlexAttention with its block mask."""
    chosen = _selection(q, k, causal, scale, selection, **params)
    return block_sparse.flex_block_mask(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias, selection=chosen,
                                        return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_searched, lse=True),
                           Backend("flex", flex_searched, flex.unavailable_masked, lse=True)])
