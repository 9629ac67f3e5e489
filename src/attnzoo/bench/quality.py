"""Quality on synthetic tasks that need no download: every method trains the same tiny causal model at equal budgets.

Model: token embedding + learned absolute position embedding, ``layers`` pre-norm blocks of
``x + Attention(LN(x))`` (``attnzoo.nn.Attention(dim, heads, method=..., causal=True)``, with the paper's layer parts
where :mod:`attnzoo.nn.layers` has them) and ``x + MLP(LN(x))`` (4× GELU), a final LayerNorm and a linear read-out.
AdamW (the case's ``lr``, 3e-3 by default; weight decay 0.01, linear warm-up over the first 10% of steps, then constant
or, with the case's ``cosine``, cosine decay to 0), the same seed, batch size and number of steps for every method.
A loss the method's paper adds at each layer joins the task loss (:func:`training_loss`: Hedgehog's attention
distillation). The model trains on the backend :func:`train_backend` picks (the dense reference at these short
lengths unless ``auto`` picks SDPA; an approximate method on its approximate backend). Accuracy is measured after
training on a fresh held-out batch of 256 sequences (fixed seed), counting only the scored positions.

Size parameters are set relative to the task's sequence length ``seq`` (:func:`relative_params`), never left at a
default that covers the whole sequence, by hooks of the method's spec: a method with a density setting
(``spec.at_density``: the D family, ``topk``) reads :data:`DENSITY` (1/4) of the keys; a local pattern
(``spec.at_reach``) reaches :data:`REACH` (1/8) of the sequence back (``sliding_window``: ``window = seq/8``;
``neighborhood``/``generalized_neighborhood``: the odd ``kernel_size`` nearest ``seq/8``; ``dilated``: dilation 2
over ``seq/16`` keys, so the same reach). The values used
are in each row's ``params`` and ``sizes``. A method whose accuracy stays within :data:`UNTRAINED_MARGIN` of chance is
reported as ``untrained`` (:func:`untrained`), not as a number that would rank it.

Tasks (next-token prediction, loss and accuracy only where the answer is determined):
- ``mqar`` — multi-query associative recall as in Zoology (Arora et al., "Zoology: Measuring and Improving Recall in
  Efficient Language Models", arXiv:2312.04927): ``pairs`` key-value pairs ``k₁ v₁ … kₙ vₙ`` (keys distinct, drawn
  from one half of the vocabulary, values from the other), then ``pairs`` queries, each a key from the context; the
  answer at a query is its value. Choice: queries are a random permutation of the keys, placed right after the
  context (Zoology scatters them; a compact layout keeps sequences short for CPU budgets).
- ``induction`` — induction-head copy: ``seq/2`` distinct random tokens, then the same tokens again; in the second
  half each next token is determined by the first occurrence of the current one (distinct, so exactly one).
- ``selective_copy`` — selective copying as in the Mamba paper (Gu & Dao, arXiv:2312.00752): ``tokens`` data tokens at
  random positions among ``seq`` noise (blank) tokens, a separator, then ``tokens`` markers; at the j-th marker the
  answer is the j-th data token in order.

Chance accuracy is ``1 / answer vocabulary`` (reported as ``chance``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

IGNORE = -100
Batch = tuple[torch.Tensor, torch.Tensor]
DENSITY = 1 / 4  # the fraction of the keys a selection (D family, topk) reads
REACH = 1 / 8  # how far back a local pattern reaches, as a fraction of the sequence
UNTRAINED_MARGIN = 0.1  # untrained: accuracy < chance + margin·(1 − chance)
DENSE_TRAINING = 256  # up to this many tokens a model trains on the method's dense reference (train_backend)
LR_TIE = 0.005  # sweep accuracies this close are a tie (the larger rate wins)


def untrained(accuracy: float, chance: float) -> bool:
    """Whether ``accuracy`` is so near ``chance`` that the model did not learn the task: below
    ``chance + UNTRAINED_MARGIN · (1 − chance)``."""
    return accuracy < chance + UNTRAINED_MARGIN * (1 - chance)


def choose_lr(rows: list[dict[str, Any]]) -> float | None:
    """The learning rate of the best sweep row (``sweep`` True, status ok): the highest accuracy, and among rates
    within :data:`LR_TIE` of it the largest; None without one."""
    ok = [r for r in rows if r.get("sweep") and r.get("status") == "ok"]
    if not ok:
        return None
    best = max(r["accuracy"] for r in ok)
    return float(max(r["lr"] for r in ok if r["accuracy"] >= best - LR_TIE))


def accuracy_text(accuracy: float, chance: float, spec: str = ".3f") -> str:
    """``accuracy`` formatted with ``spec``, or ``untrained`` near chance (:func:`untrained`)."""
    return "untrained" if untrained(accuracy, chance) else format(accuracy, spec)


def mqar(batch: int, g: torch.Generator, pairs: int = 8, vocab: int = 64, **_: Any) -> tuple[Batch, int, int]:
    """``(inputs, targets), vocab size, answer vocabulary`` for multi-query associative recall."""
    half = vocab // 2
    if pairs > half:
        raise ValueError(f"mqar: pairs ({pairs}) must be at most vocab/2 ({half})")
    keys = torch.stack([torch.randperm(half, generator=g)[:pairs] for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, pairs), generator=g)
    order = torch.stack([torch.randperm(pairs, generator=g) for _ in range(batch)])
    context = torch.stack([keys, values], dim=-1).reshape(batch, 2 * pairs)
    queries = torch.gather(keys, 1, order)
    x = torch.cat([context, queries], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, 2 * pairs :] = torch.gather(values, 1, order)
    return (x, y), vocab, vocab - half


def induction(batch: int, g: torch.Generator, seq: int = 32, vocab: int = 32, **_: Any) -> tuple[Batch, int, int]:
    """``(inputs, targets), vocab size, answer vocabulary`` for induction copy: ``seq/2`` distinct tokens, then the
    same again (distinct, so that the current token's first occurrence determines the next one)."""
    half = seq // 2
    if half > vocab:
        raise ValueError(f"induction: seq/2 ({half}) must be at most vocab ({vocab})")
    first = torch.stack([torch.randperm(vocab, generator=g)[:half] for _ in range(batch)])
    x = torch.cat([first, first], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, half:-1] = x[:, half + 1 :]
    return (x, y), vocab, vocab


def selective_copy(
    batch: int, g: torch.Generator, seq: int = 32, tokens: int = 4, vocab: int = 16, **_: Any
) -> tuple[Batch, int, int]:
    """``(inputs, targets), vocab size, answer vocabulary`` for selective copy. Vocabulary: 0 blank, 1 separator,
    2 marker, 3.. data tokens."""
    data = torch.randint(3, vocab, (batch, tokens), generator=g)
    where = torch.stack([torch.randperm(seq, generator=g)[:tokens].sort().values for _ in range(batch)])
    region = torch.zeros(batch, seq, dtype=torch.long).scatter_(1, where, data)
    tail = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, tokens), 2)], dim=1)
    x = torch.cat([region, tail], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, seq + 1 :] = data
    return (x, y), vocab, vocab - 3


TASKS: dict[str, Callable[..., tuple[Batch, int, int]]] = {
    "mqar": mqar, "induction": induction, "selective_copy": selective_copy,
}


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int, max_len: int, dim: int, heads: int, layers: int, method: str, params: dict[str, Any],
        backend: str = "auto", layer_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        from attnzoo.nn import Attention

        self.layer_loss = layer_loss
        self.extra_loss = torch.zeros(())
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "ln1": nn.LayerNorm(dim),
                        "attn": Attention(dim, heads, method=method, causal=True, backend=backend, **params),
                        "ln2": nn.LayerNorm(dim),
                        "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                    }
                )
            )
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        extra = []
        for block in self.blocks:
            a = block["ln1"](h)
            if self.layer_loss is not None and self.training:
                extra.append(self.layer_loss(block["attn"], a))
            h = h + block["attn"](a)
            h = h + block["mlp"](block["ln2"](h))
        self.extra_loss = torch.stack(extra).sum() if extra else torch.zeros((), device=h.device)
        return self.head(self.ln(h))


def fit(
    model: nn.Module, batches: Callable[[], Batch], steps: int, lr: float, cosine: bool = False,
) -> tuple[float, float]:
    """Train ``model`` for ``steps`` on ``batches()`` (inputs, next-token targets with ``IGNORE``): AdamW (weight decay
    0.01), linear warm-up over the first 10 % of steps (then constant, or cosine decay to 0 with ``cosine``),
    gradients clipped at norm 1. Returns the last loss and the seconds it took."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)

    def rate(s: int) -> float:
        return min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * s / steps)) if cosine else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    start = time.perf_counter()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x, y = batches()
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + getattr(model, "extra_loss", 0.0)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return float(loss.detach()), time.perf_counter() - start


def plan(
    methods: list[Any], tasks: list[dict[str, Any]], model: dict[str, Any], seed: int, device: str
) -> list[dict[str, Any]]:
    """One case per method and task setting; methods without causal self-attention are recorded as unsupported."""
    cases = []
    for task in tasks:
        for m in methods:
            case = {"kind": "quality", "method": m.name, "task": task, "seed": seed, "device": device, **model}
            if "self/causal" not in m.spec.patterns:
                case["skip"] = "the method has no causal self-attention pattern"
            elif not m.spec.differentiable:
                case["skip"] = "inference-only method (spec.differentiable is False)"
            elif any(p.required for p in m.spec.params):
                case["skip"] = "takes a required per-call input (" + ", ".join(
                    p.name for p in m.spec.params if p.required) + ") that a model layer does not make"
            cases.append(case)
    return cases


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train and score one method on one task (with the allocator set for training loops:
    :func:`attnzoo.bench.measure.kept_heap`)."""
    from attnzoo.bench.efficiency import guarded
    from attnzoo.bench.measure import kept_heap

    with kept_heap():
        return guarded(case, _train)


def _train(case: dict[str, Any]) -> dict[str, Any]:
    from attnzoo.registry import get

    task = dict(case["task"])
    make = TASKS[task.pop("name")]
    device = torch.device(case["device"])
    seed = int(case.get("seed", 0))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (x0, _), vocab, answers = make(1, g, **task)
    m = get(case["method"])
    params, call = fixed_params(m, x0.shape[1], case)
    sizes = relative_params(m, call)
    params = {n: v for n, v in {**params, **sizes, **case.get("params", {})}.items() if n not in layer_computes(m.name)}
    backend = train_backend(m, call, case.get("avoid", ()))
    model = TinyLM(vocab, x0.shape[1], case["dim"], case["heads"], case["layers"], case["method"], params,
                   backend, training_loss(m.name)).to(device)
    steps, batch = int(case["steps"]), int(case["batch"])

    def batches() -> Batch:
        (x, y), _, _ = make(batch, g, **task)
        return x.to(device), y.to(device)

    loss, train_time = fit(model, batches, steps, float(case.get("lr", 3e-3)), bool(case.get("cosine", False)))
    model.eval()
    (x, y), _, _ = make(256, torch.Generator().manual_seed(seed + 1_000_003), **task)
    with torch.no_grad():
        pred = model(x.to(device)).argmax(-1).cpu()
    scored = y != IGNORE
    return {
        "accuracy": float((pred[scored] == y[scored]).float().mean()),
        "chance": 1.0 / answers,
        "final_loss": loss,
        "train_time_s": train_time,
        "seq": int(x.shape[1]),
        "backend": backend,
        "params": {n: v for n, v in params.items() if isinstance(v, (bool, int, float, str))},
        "sizes": sizes,
        "layer": "paper" if model.blocks[0]["attn"].parts is not None else "kernel",
        "layer_loss": model.layer_loss is not None,
    }


def train_backend(m: Any, call: Any, avoid: Any = ()) -> str:
    """The backend a quality model trains ``m`` on: the fast path ``auto`` picks (``pick_backend``) where it is
    PyTorch's fused ``sdpa`` or the sequence is longer than :data:`DENSE_TRAINING`, else the method's ``reference``.

    At the study's lengths (24–64 tokens) the blockwise fast paths are bookkeeping around tiny blocks: measured per
    training step (MQAR 8 pairs, width 64, batch 32, one thread), ``moba`` 34.5 ms on its fast path against 12.7 ms
    on the reference, ``pbs`` 34.5/11.9, ``hip`` 32.9/12.2, ``hedgehog`` 20.6/13.4, ``gated_delta`` 24.1/20.1, softmax
    9.7 (sdpa). The reference is the method's definition and the conformance suite holds every fast path to it, so
    the model learns the same function; the row records the backend used.

    A method with an approximate backend (a quantised kernel of an exact formula, ``sage``) trains on that backend,
    since its reference is the exact formula, not the method; where that backend cannot train (no backward), the case
    is unsupported rather than a measurement of the reference."""
    from attnzoo.bench.efficiency import pick_backend
    from attnzoo.errors import AttnzooError

    fast = pick_backend(m, call, avoid)
    approximate = {b.name for b in m.backends if not b.exact}
    if approximate:
        if fast in approximate:
            return fast
        raise AttnzooError(f"backend: {m.name}'s approximate backend ({', '.join(sorted(approximate))}) cannot train "
                           "(no backward); training its exact reference would measure the reference, not the method")
    if fast == "sdpa" or call.seq_kv > DENSE_TRAINING or "reference" in set(avoid):
        return fast
    return "reference"


def training_loss(method: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    """A loss the method's paper adds to the task loss at each attention layer (called with the layer and its
    input), or None: Hedgehog trains its feature maps by attention distillation against the layer's own softmax
    weights (:func:`attnzoo.nn.layers.hedgehog.distillation_loss`), our reading of the paper's training from scratch
    (its §4 recipe applied jointly with the task, as the only softmax teacher is the layer's own scores)."""
    if method == "hedgehog":
        from attnzoo.nn.layers.hedgehog import distillation_loss

        return distillation_loss
    return None


def layer_computes(method: str) -> tuple[str, ...]:
    """The method parameters its paper layer (:data:`attnzoo.nn.layers.LAYERS`) computes from the input: they are
    not passed to the layer."""
    from attnzoo.nn.layers import LAYERS

    return tuple(getattr(LAYERS.get(method), "computes", ()))


def relative_params(m: Any, call: Any) -> dict[str, Any]:
    """The size parameters of ``m`` for ``call``'s sequence, relative to its length (module docstring): the method's
    ``spec.at_density(call, DENSITY)`` (selections: the D family, ``topk``) or ``spec.at_reach(call, REACH)`` (local
    patterns); ``{}`` for a method with neither."""
    if m.spec.at_density is not None:
        return dict(m.spec.at_density(call, DENSITY))
    if m.spec.at_reach is not None:
        return dict(m.spec.at_reach(call, REACH))
    return {}


def fixed_params(m: Any, seq: int, case: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Plain (non-learnable) parameter values valid for this model's shapes: the defaults where they are valid,
    else what the method's test hints sample for a ``(batch, heads, seq, head_dim)`` call (every plain parameter is
    checked, the defaults a candidate leaves out included: a default ``top_k`` can exceed a short sequence's
    blocks)."""
    from attnzoo.bench.measure import make_call, method_params

    head_dim = case["dim"] // case["heads"]
    shape = {"batch": case["batch"], "heads": case["heads"], "kv_heads": case["heads"], "seq_q": seq, "seq_kv": seq,
             "head_dim": head_dim, "device": case["device"], "dtype": "float32"}
    call = make_call(shape, causal=True, requires_grad=True)
    for candidate in method_params(m, call, int(case.get("seed", 0))):
        plain = {n: v for n, v in candidate.items() if not isinstance(v, torch.Tensor)}
        checked = replace(call, params=plain)
        try:
            for p in m.spec.params:
                if p.name in plain or (p.init is None and not isinstance(p.default, torch.Tensor)):
                    p.validate(plain.get(p.name, p.default), checked)
        except ValueError:
            continue
        return plain, call
    return {}, call
