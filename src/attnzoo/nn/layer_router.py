"""Flux-style layer routing: each attention layer runs full or sparse attention, chosen per sequence by a router.

Paper: "Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs Inference" (Qiu et al., arXiv:2604.07394;
public code github.com/qqtang-code/FluxAttention, read for the details below). A lightweight Layer Router added to
each layer of a frozen pretrained model routes the whole layer to full attention (FA) or sparse attention (SA) from
the input context. Routing a whole layer (not single heads) keeps memory access contiguous, so the saved work turns
into wall-clock time; only the routers (and the budget multipliers) are trained.

Per layer, for a sequence with queries ``q (H, N, D)`` (the layer's projected queries):

- pool: ``p = mean over heads and over the first and the last `pool` positions of q`` -> ``(D,)``;
- router: ``logits = MLP(p)`` with widths ``D -> 8D -> 2D -> 4D -> D -> 2`` (SiLU between), ``logits = (sparse,
  full)``; the last layer starts at zero weight and bias ``(0, full_bias)``, so every layer starts full (the frozen
  model unchanged, ``p_full = sigmoid(4.5) ~ 0.989``);
- training: straight-through Gumbel-softmax, ``y = softmax((logits + g) / tau)`` with Gumbel noise ``g``, ``z =
  onehot(argmax y) + y - stop_grad(y)``, ``gate = z_full``; the output is ``gate * FA + (1 - gate) * SA``: exactly
  one branch's value in the forward, the relaxed gradient in the backward (both branches are computed);
- inference: ``full = logit_full > logit_sparse``; only the chosen branch is computed for each sequence.

Training (:func:`train_routers`), the paper's objective with one documented substitution: the model's full-layer
fraction ``f_b = mean over layers of gate`` per sequence is held to a target ``t`` by
``budget = mean_b(lambda1 * |f_b - t| + lambda2 * (f_b - t)^2)`` whose multipliers start at 0 and are trained by
gradient *ascent* (the Lagrangian of PruLong/Flux; the paper states it with the sparse fraction ``1 - f``, the same
thing). The paper's task loss is the language-model loss of the frozen model on its SFT data; here it is a
distillation loss against the same model with every layer forced to full attention (by default the MSE of the
outputs, any ``loss_fn(routed, reference)`` may replace it), so no labels are needed. The temperature follows the
paper's schedule: cosine from 1.5 to 1.0 over the first 60 % of the steps, then 1.0. Router learning rate and
multiplier learning rate default to the paper's ``1e-3``.

Choices and what could not be verified: the public code pools over the boundaries of marked context and question
segments (``range_ids`` from its data pipeline) with ``pool = 150`` in its launch script; attnzoo has no segment
markup, so it pools the first and last ``pool`` (default 100, the code's default) positions of the whole sequence
(both slices concatenated, so a sequence shorter than ``2 * pool`` counts its middle twice). The router reads the
queries as :class:`~attnzoo.nn.Attention` projects them (the code reads them after the projection and q-norm, before
RoPE). The code's sparse branches are streaming (sink + window), local window and XAttention; here the sparse branch
is any registered attnzoo method with its parameters. The paper's task-specific multipliers, target warm-up (0 in its
launch script) and LM loss are not reproduced; nothing here was checked against the paper's reported accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.nn.attention import Attention
from attnzoo.registry import methods

ROUTES = ("router", "full", "sparse")


@dataclass(frozen=True)
class Route:
    """A layer's last routing, one entry per sequence of the batch.

    ``full (B,)`` bool: the branch taken (True = full attention). ``p_full (B,)``: the router's noise-free probability
    of full attention at its current temperature (1 or 0 when the route is forced). ``gate (B,)``: the value that
    weighted the full branch, differentiable in training (hard in the forward, relaxed in the backward); it is what
    :func:`full_fraction` averages.
    """

    full: torch.Tensor
    p_full: torch.Tensor
    gate: torch.Tensor


class LayerRouter(nn.Module):
    """The per-layer router: queries ``q (B, H, N, D)`` -> logits ``(B, 2)`` = (sparse, full), see the module doc."""

    def __init__(self, head_dim: int, pool: int = 100, full_bias: float = 4.5) -> None:
        super().__init__()
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise fail("pool", "a positive int", repr(pool))
        if isinstance(full_bias, bool) or not isinstance(full_bias, (int, float)) or not math.isfinite(full_bias):
            raise fail("full_bias", "a finite number", repr(full_bias))
        d = head_dim
        self.pool = pool
        self.mlp = nn.Sequential(
            nn.Linear(d, 8 * d), nn.SiLU(), nn.Linear(8 * d, 2 * d),
            nn.Linear(2 * d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU(), nn.Linear(d, 2),
        )
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, float(full_bias)]))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        ends = torch.cat((q[:, :, : self.pool], q[:, :, -self.pool :]), dim=2)
        return self.mlp(ends.mean(dim=(1, 2)).to(self.mlp[0].weight.dtype))


def gumbel_gate(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The straight-through Gumbel-softmax gate of full attention, ``(B, 2)`` logits -> ``(B,)``: 0 or 1 in the
    forward, the gradient of ``softmax((logits + g) / temperature)[:, 1]`` in the backward."""
    u = torch.rand_like(logits)
    g = -torch.log(-torch.log(u + 1e-8) + 1e-8)
    soft = F.softmax((logits + g) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard + soft - soft.detach())[:, 1]


class RoutedAttention(Attention):
    """Multi-head attention ``x (B, N, dim) -> (B, N, dim)`` whose every sequence runs full softmax attention or the
    ``sparse`` method, as its :class:`LayerRouter` decides (Flux Attention, arXiv:2604.07394; see the module doc).

    ``sparse`` is any registered method but ``softmax``; ``**params`` are its parameters and ``backend`` its backend
    (the full branch is ``softmax`` with ``backend="auto"``); the sparse branch is the bare kernel, without the
    paper layer parts :class:`~attnzoo.nn.Attention` builds for it alone (``faithful``). Causal by default (the LLM
    setting). ``pool``, ``full_bias``: the router's (:class:`LayerRouter`). ``temperature``: the Gumbel-softmax
    temperature in training (:func:`train_routers` anneals it). ``route``: ``"router"`` (default), or
    ``"full"``/``"sparse"`` to force every sequence down one branch (the router is not run). After each forward,
    :attr:`last_route` holds the :class:`Route` taken.
    """

    def __init__(
        self, dim: int, heads: int, sparse: str, kv_heads: int | None = None, head_dim: int | None = None,
        causal: bool = True, context_dim: int | None = None, qkv_bias: bool = False, backend: str = "auto",
        pool: int = 100, full_bias: float = 4.5, temperature: float = 1.0, **params: Any,
    ) -> None:
        if not isinstance(sparse, str) or sparse not in methods():
            raise fail("sparse", "a registered method name (see attnzoo.methods())", repr(sparse))
        if sparse == "softmax":
            raise fail("sparse", "a method other than 'softmax' (the full branch)", repr(sparse))
        super().__init__(
            dim, heads, kv_heads=kv_heads, head_dim=head_dim, method=sparse, causal=causal, context_dim=context_dim,
            qkv_bias=qkv_bias, backend=backend, faithful=False, **params,
        )  # faithful=False: a paper layer's parts belong to one method, and this layer runs two on the same heads
        self.router = LayerRouter(self.head_dim, pool=pool, full_bias=full_bias)
        _check_temperature(temperature)
        self.temperature = temperature
        self.route = "router"
        self.last_route: Route | None = None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.route not in ROUTES:
            raise fail("route", f"one of {ROUTES}", repr(self.route))
        _check_temperature(self.temperature)
        q, k, v = self.project(x, context)
        b = q.shape[0]
        if self.route != "router":
            full = torch.full((b,), self.route == "full", device=q.device)
            gate = p_full = full.to(q.dtype)
            out = self._branch(full[0].item(), q, k, v, mask)
        else:
            logits = self.router(q)
            p_full = F.softmax(logits.detach() / self.temperature, dim=-1)[:, 1]
            if self.training:
                gate = gumbel_gate(logits, self.temperature)
                full = gate.detach() > 0.5
                g = gate.view(b, 1, 1, 1)
                out = g * self._branch(True, q, k, v, mask) + (1 - g) * self._branch(False, q, k, v, mask)
            else:
                full = logits[:, 1] > logits[:, 0]
                gate = full.to(q.dtype)
                out = self._rows(full, q, k, v, mask)
        self.last_route = Route(full=full, p_full=p_full, gate=gate)
        return self.merge_heads(out, x)

    def _branch(
        self, full: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Full softmax or the sparse method over the whole batch, ``(B, H, N, Dv)``."""
        if full:
            return attention(q, k, v, method="softmax", causal=self.causal, mask=mask)
        return attention(
            q, k, v, method=self.method, causal=self.causal, mask=mask, backend=self.backend,
            **self.fixed, **dict(self.learnable.items()),
        )

    def _rows(
        self, full: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Inference: each sequence through its chosen branch only (one call per branch that has sequences)."""
        if full.all() or not full.any():
            return self._branch(bool(full[0]), q, k, v, mask)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for chosen in (True, False):
            rows = full if chosen else ~full
            m = mask[rows] if mask is not None and mask.dim() == 4 and mask.shape[0] > 1 else mask
            out[rows] = self._branch(chosen, q[rows], k[rows], v[rows], m)
        return out

    def extra_repr(self) -> str:
        return f"sparse={self.method!r}, heads={self.heads}, causal={self.causal}, route={self.route!r}"


def _check_temperature(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise fail("temperature", "a positive finite number", repr(value))


def routed_layers(model: nn.Module) -> dict[str, RoutedAttention]:
    """The :class:`RoutedAttention` layers of ``model`` by qualified name (``""`` if ``model`` is one)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedAttention)}


def routing_decisions(model: nn.Module) -> dict[str, Route]:
    """The last :class:`Route` of every routed layer of ``model`` that has run, by layer name."""
    return {name: m.last_route for name, m in routed_layers(model).items() if m.last_route is not None}


def full_fraction(model: nn.Module) -> torch.Tensor:
    """The fraction of ``model``'s routed layers that ran full attention in its last forward, per sequence ``(B,)``;
    differentiable after a training forward (the mean of the layers' gates)."""
    routes = routing_decisions(model)
    if not routes:
        raise fail("model", "a model whose RoutedAttention layers have run a forward", "no routing recorded")
    return torch.stack([r.gate for r in routes.values()]).mean(dim=0)


@contextmanager
def forced_route(model: nn.Module, route: str) -> Iterator[None]:
    """Within the block, every routed layer of ``model`` takes ``route`` (``"full"``, ``"sparse"`` or
    ``"router"``); their own routes are restored after."""
    layers = routed_layers(model).values()
    before = [m.route for m in layers]
    try:
        for m in layers:
            m.route = route
        yield
    finally:
        for m, r in zip(layers, before, strict=True):
            m.route = r


@dataclass(frozen=True)
class RouterStep:
    """One step of :func:`train_routers`: the task (distillation) and budget losses, the batch's mean full-layer
    fraction, the temperature and the two multipliers."""

    task_loss: float
    budget_loss: float
    full_fraction: float
    temperature: float
    lambdas: tuple[float, float]


def temperature_at(step: int, steps: int, start: float = 1.5, end: float = 1.0, anneal: float = 0.6) -> float:
    """The paper's temperature schedule: cosine from ``start`` to ``end`` over the first ``anneal`` of ``steps``."""
    span = math.ceil(anneal * steps)
    if step >= span:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / span))


def train_routers(
    model: nn.Module, batches: Iterable[Any], steps: int, target_full: float, lr: float = 1e-3,
    budget_lr: float = 1e-3, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
) -> list[RouterStep]:
    """Train the routers of ``model``'s :class:`RoutedAttention` layers, everything else frozen (Flux Attention's
    objective, see the module doc): ``loss = loss_fn(routed, reference) + budget(full_fraction, target_full)``.

    ``batches`` yields the model's inputs (a tensor: ``model(x)``; a tuple: ``model(*x)``; a dict: ``model(**x)``);
    ``model`` returns a tensor. ``reference`` is ``model`` on the same batch with every layer forced to full attention.
    Runs ``min(steps, len(batches))`` Adam steps (router ``lr``; multipliers ``budget_lr``, by ascent), annealing the
    temperature over ``steps``. The routed layers run in training mode (Gumbel gates), the rest of ``model`` in eval
    mode (it is frozen). Leaves ``model`` in eval mode with its parameters' ``requires_grad`` as they were; returns
    one :class:`RouterStep` per step.
    """
    layers = list(routed_layers(model).values())
    if not layers:
        raise fail("model", "a model with at least one RoutedAttention layer", "none")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise fail("steps", "a positive int", repr(steps))
    if isinstance(target_full, bool) or not isinstance(target_full, (int, float)) or not 0 <= target_full <= 1:
        raise fail("target_full", "a number in [0, 1]", repr(target_full))
    for name, value in (("lr", lr), ("budget_lr", budget_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise fail(name, "a positive finite number", repr(value))
    router_params = [p for m in layers for p in m.router.parameters()]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for p in router_params:
        p.requires_grad_(True)
    device = router_params[0].device
    lambdas = torch.zeros(2, device=device, requires_grad=True)
    opt = torch.optim.Adam([
        {"params": router_params, "lr": lr},
        {"params": [lambdas], "lr": budget_lr, "maximize": True},
    ])
    history = []
    model.eval()  # the frozen rest of the model runs deterministically; only the routed layers sample their gates
    for m in layers:
        m.train()
    try:
        for step, batch in zip(range(steps), batches, strict=False):
            tau = temperature_at(step, steps)
            for m in layers:
                m.temperature = tau
            with torch.no_grad(), forced_route(model, "full"):
                reference = _call(model, batch)
            task = loss_fn(_call(model, batch), reference)
            gap = full_fraction(model) - target_full
            budget = (lambdas[0] * gap.abs() + lambdas[1] * gap.square()).mean()
            opt.zero_grad()
            (task + budget).backward()
            opt.step()
            history.append(RouterStep(
                task.item(), budget.item(), (gap.detach() + target_full).mean().item(), tau,
                (lambdas[0].item(), lambdas[1].item()),
            ))
    finally:
        model.eval()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return history


def _call(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
