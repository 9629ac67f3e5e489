"""The press benchmark's test bed: key-value retrieval with distractors, and a small causal model that solves it.

**Task** (:func:`retrieval_batch`). A context of ``context`` tokens holds ``pairs`` key-value pairs ``k v`` scattered
among filler tokens (the distractors). Each sequence draws its pairs' keys from ``keys`` key symbols with replacement
(so some keys occur several times, always with the same value: a random key → value table per sequence) and values
from ``values`` value symbols. After the context come ``queries`` query tokens, each a key that occurred in the
context; the answer at a query is its value (multi-query associative recall, Zoology, arXiv:2312.04927, with filler
distractors and queries after a long context). While training, a repeated key inside the context is also scored (its
next token is determined), which gives many more training signals per sequence than the queries alone.

Vocabulary: ``[0, fillers)`` filler symbols, then the keys, then the values. The answer vocabulary is the values
(chance ``1 / values``). :class:`Retrieval` also says where each query's answer lies (``needles``: the positions of the
value tokens of its key), so a test can drop exactly those.

**Model** (:class:`RetrievalLM`). Token embedding plus a *previous-token* embedding (token shift: position ``t`` also
embeds token ``t − 1``, as the "smeared keys" of induction-head studies and the short convolutions of Zoology's
BaseConv do), no positional embedding, ``layers`` pre-norm blocks of ``attnzoo.nn.Attention(dim, heads,
method="softmax", causal=True)`` and a 4× GELU MLP, a final LayerNorm and a read-out over the values. Choices: the
token shift lets one attention layer retrieve (a value token's key carries its key's identity), so the model learns in
a few hundred steps on a CPU; with no positional embedding, a model trained on short contexts (``train_context``)
runs unchanged on the long context of the evaluation (content-based retrieval does not depend on length), which keeps
training cheap.

**Evaluation with a press** (:func:`evaluate`). The context is the prompt: each layer's attention runs as
``attnzoo.prefill(q, k, v, method="softmax", press=press, layer=i)``, which attends the whole prompt and then
compresses that layer's cache; the queries follow through ``attnzoo.step`` (one token at a time, the press's ``step``
after each), so every query reads only what the press kept. The prompt holds no query: compression is
question-agnostic (the press cannot know which key will be asked for).

Training (:func:`trained_model`, the loop of :func:`attnzoo.bench.quality.fit`): AdamW (lr 1e-2, weight decay 0.01,
linear warm-up over 10 % of the steps, then cosine decay), gradient clipping at 1. The weights are cached in a
directory (keyed by a hash of the configuration), so a second run loads them instead of training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import attnzoo.api as az
from attnzoo.bench.quality import IGNORE, fit
from attnzoo.errors import fail
from attnzoo.kv.presses.base import Press
from attnzoo.nn import Attention


@dataclass(frozen=True)
class RetrievalTask:
    """Sizes of the retrieval task: ``context`` tokens holding ``pairs`` key-value pairs among fillers, then
    ``queries`` query keys; ``keys``/``values``/``fillers`` symbols of each kind."""

    context: int = 512
    pairs: int = 96
    queries: int = 8
    keys: int = 64
    values: int = 64
    fillers: int = 16

    def __post_init__(self) -> None:
        for name in ("pairs", "queries", "keys", "values", "fillers"):
            if getattr(self, name) < 1:
                raise fail(name, "a positive number of tokens or symbols", getattr(self, name))
        if self.context < 2 * self.pairs:
            raise fail("context", f"at least 2 × pairs = {2 * self.pairs} tokens", self.context)

    @property
    def vocab(self) -> int:
        return self.fillers + self.keys + self.values


@dataclass(frozen=True)
class Retrieval:
    """A batch: ``context (B, C)`` tokens and their training ``targets (B, C)`` (``IGNORE`` where undetermined),
    ``queries (B, Q)`` key tokens, ``answers (B, Q)`` value indices (``0..values-1``) and ``needles (B, Q, C)``: True at
    the positions of the value tokens that answer each query."""

    context: torch.Tensor
    targets: torch.Tensor
    queries: torch.Tensor
    answers: torch.Tensor
    needles: torch.Tensor


def retrieval_batch(task: RetrievalTask, batch: int, g: torch.Generator) -> Retrieval:
    """``batch`` sequences of the task, drawn from ``g`` (see the module docstring)."""
    c, p, value0 = task.context, task.pairs, task.fillers + task.keys
    keys = torch.randint(0, task.keys, (batch, p), generator=g)
    table = torch.randint(0, task.values, (batch, task.keys), generator=g)
    values = table.gather(1, keys)
    # items: p pairs and c - 2p fillers in a random order; a pair's key sits at its item's start, its value right after
    items = c - p
    is_pair = torch.rand(batch, items, generator=g).argsort(1).argsort(1) < p  # p random items per row
    width = 1 + is_pair.long()
    start = torch.cumsum(width, 1) - width
    pair_start = start[is_pair].view(batch, p)  # in item order, so the j-th pair is the j-th pair item
    context = torch.randint(0, task.fillers, (batch, c), generator=g)
    context.scatter_(1, pair_start, task.fillers + keys)
    context.scatter_(1, pair_start + 1, value0 + values)
    seen_before = (keys.unsqueeze(2) == keys.unsqueeze(1)).tril(-1).any(2)  # (B, p): key occurred in an earlier pair
    targets = torch.full((batch, c), IGNORE)
    targets.scatter_(1, pair_start, torch.where(seen_before, values, IGNORE))
    asked = torch.stack([keys[b, torch.randint(0, p, (task.queries,), generator=g)] for b in range(batch)])
    where = (asked.unsqueeze(2) == keys.unsqueeze(1))  # (B, Q, p): the pairs holding each query's key
    needles = torch.zeros(batch, task.queries, c, dtype=torch.bool)
    needles.scatter_(2, (pair_start + 1).unsqueeze(1).expand_as(where), where)
    return Retrieval(context, targets, task.fillers + asked, table.gather(1, asked), needles)


def training_sequence(data: Retrieval) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of next-token training: the context then the queries; targets in the value vocabulary."""
    x = torch.cat([data.context, data.queries], 1)
    y = torch.cat([data.targets, data.answers], 1)
    return x, y


class RetrievalLM(nn.Module):
    """The test bed model (module docstring): ``forward(x (B, N)) -> logits (B, N, values)``; :func:`evaluate` runs
    the same weights through ``attnzoo.prefill``/``attnzoo.step``."""

    def __init__(self, vocab: int, values: int, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.prev = nn.Embedding(vocab + 1, dim)  # index ``vocab``: nothing before the first token
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(dim), "attn": Attention(dim, heads, method="softmax", causal=True),
                           "ln2": nn.LayerNorm(dim),
                           "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))})
            for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, values)

    def embed_tokens(self, x: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``x (B, N)``; ``before (B,)``: the token preceding ``x[:, 0]`` (None: the sequence starts)."""
        first = torch.full_like(x[:, :1], self.vocab) if before is None else before.view(-1, 1)
        return self.embed(x) + self.prev(torch.cat([first, x[:, :-1]], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x)
        for block in self.blocks:
            h = h + block["attn"](block["ln1"](h))
            h = h + block["mlp"](block["ln2"](h))
        return self.head(self.ln(h))


def _heads(attn: Attention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v (B, heads, N, head_dim)`` of ``attn`` for the normalised hidden states ``h (B, N, dim)``."""
    b, n, _ = h.shape

    def split(proj: nn.Linear, heads: int) -> torch.Tensor:
        return proj(h).view(b, n, heads, attn.head_dim).transpose(1, 2)

    return split(attn.q_proj, attn.heads), split(attn.k_proj, attn.kv_heads), split(attn.v_proj, attn.kv_heads)


def _merge(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, attn.heads * attn.head_dim))


def layer_inputs(model: RetrievalLM, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each layer's ``(q, k, v)`` over ``context (B, C)`` with the full cache: calibration data for presses that
    learn from the model's attention."""
    h, got = model.embed_tokens(context), []
    with torch.no_grad():
        for block in model.blocks:
            q, k, v = _heads(block["attn"], block["ln1"](h))
            got.append((q, k, v))
            h = h + block["attn"](block["ln1"](h))
            h = h + block["mlp"](block["ln2"](h))
    return got


def decode_answers(model: RetrievalLM, data: Retrieval, press: Press | None) -> tuple[torch.Tensor, list[Any]]:
    """Predicted values ``(B, Q)`` for the queries of ``data``, the context prefilled layer by layer through
    ``attnzoo.prefill(..., press=press, layer=i)`` and the queries decoded with ``attnzoo.step``; also each layer's
    cache after the prompt (what the press kept)."""
    states, caches = [], []
    with torch.no_grad():
        h = model.embed_tokens(data.context)
        for i, block in enumerate(model.blocks):
            out, state = az.prefill(*_heads(block["attn"], block["ln1"](h)), method="softmax", press=press, layer=i)
            states.append(state)
            caches.append(state.data)
            h = h + _merge(block["attn"], out)
            h = h + block["mlp"](block["ln2"](h))
        h = model.embed_tokens(data.queries, before=data.context[:, -1])
        for i, block in enumerate(model.blocks):
            out, states[i] = az.step(states[i], *_heads(block["attn"], block["ln1"](h)))
            h = h + _merge(block["attn"], out)
            h = h + block["mlp"](block["ln2"](h))
        return model.head(model.ln(h)).argmax(-1), caches


def chunks(data: Retrieval, size: int) -> Iterator[Retrieval]:
    """``data`` in batches of at most ``size`` sequences."""
    for s in range(0, data.context.shape[0], size):
        yield Retrieval(*(t[s : s + size] for t in (data.context, data.targets, data.queries, data.answers,
                                                    data.needles)))


def evaluate(model: RetrievalLM, data: Retrieval, press: Press | None, chunk: int = 64) -> dict[str, float]:
    """Accuracy on ``data``'s queries with ``press`` (None: the full cache), and what the first layer's cache holds
    after the prompt: ``cache_bytes`` (:attr:`KVCache.nbytes`, summed over chunks) and ``cache_tokens`` (occupied
    slots, summed over sequences and kv heads)."""
    right, total, held, tokens = 0, 0, 0, 0
    for part in chunks(data, chunk):
        pred, caches = decode_answers(model, part, press)
        right += int((pred == part.answers).sum())
        total += pred.numel()
        held += int(caches[0].nbytes)
        tokens += int(caches[0].token_counts().sum())
    return {"accuracy": right / total, "cache_bytes": held, "cache_tokens": tokens}


@dataclass(frozen=True)
class Training:
    """How the model is trained: model sizes, the short training task, steps, batch, learning rate, seed."""

    dim: int = 64
    heads: int = 4
    layers: int = 2
    train_context: int = 64
    train_pairs: int = 16
    steps: int = 800
    batch: int = 32
    lr: float = 1e-2
    seed: int = 0


def train(task: RetrievalTask, cfg: Training) -> tuple[RetrievalLM, dict[str, Any]]:
    """Train a :class:`RetrievalLM` on the short task; returns it (in eval mode) and what training did."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    short = replace(task, context=cfg.train_context, pairs=cfg.train_pairs)
    model = RetrievalLM(task.vocab, task.values, cfg.dim, cfg.heads, cfg.layers)

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        return training_sequence(retrieval_batch(short, cfg.batch, g))

    loss, seconds = fit(model, batches, cfg.steps, cfg.lr, cosine=True)
    model.eval()
    return model, {"final_loss": loss, "train_s": seconds}


def trained_model(task: RetrievalTask, cfg: Training, cache_dir: Path) -> tuple[RetrievalLM, dict[str, Any]]:
    """The model for ``task`` and ``cfg``: loaded from ``cache_dir`` if a previous run trained it, else trained and
    saved there. The info says which (``cached``) and how training went."""
    key = hashlib.sha256(json.dumps([asdict(task), asdict(cfg)], sort_keys=True).encode()).hexdigest()[:16]
    weights, meta = cache_dir / f"retrieval-{key}.pt", cache_dir / f"retrieval-{key}.json"
    model = RetrievalLM(task.vocab, task.values, cfg.dim, cfg.heads, cfg.layers)
    if weights.exists() and meta.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        return model, {**json.loads(meta.read_text()), "cached": True}
    model, info = train(task, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    info = {**info, "weights": weights.name, "task": asdict(task), "training": asdict(cfg)}
    meta.write_text(json.dumps(info, indent=1))
    return model, {**info, "cached": False}
