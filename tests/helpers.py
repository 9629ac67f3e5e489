"""Helpers more than one test file uses: seeded inputs, dense masks, fast-path-against-reference checks, and the
per-token parameter slicing of the linear family's decoding API, and a small training loop for layer tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

import attnzoo as az
from attnzoo import masks
from attnzoo.api import prepare

F64 = torch.float64


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread (routes that only serve single-threaded calls), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def qkv(
    b: int,
    h: int,
    hkv: int,
    sq: int,
    d: int = 8,
    dv: int | None = None,
    *,
    skv: int | None = None,
    seed: int | torch.Generator = 0,
    dtype: torch.dtype = F64,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (b, h, sq, d)``, ``k (b, hkv, skv, d)``, ``v (b, hkv, skv, dv)``, drawn in that order from one generator.

    ``skv`` defaults to ``sq`` and ``dv`` to ``d``. ``seed`` is a seed, or a generator to draw from (it is left
    advanced, so a test can draw more from it). ``requires_grad`` makes the three tensors autograd leaves.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    skv = sq if skv is None else skv
    shapes = ((b, h, sq, d), (b, hkv, skv, d), (b, hkv, skv, d if dv is None else dv))
    q, k, v = (torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(requires_grad) for s in shapes)
    return q, k, v


def dense_mask(mod: masks.MaskMod, n: int) -> torch.Tensor:
    """The ``(n, n)`` boolean mask ``mod`` gives one batch and head of self-attention over ``n`` positions."""
    return masks.dense(mod, 1, 1, n, n, "cpu")[0, 0]


def weights_of(method: str, q: torch.Tensor, k: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The attention weights, read off by attending over one-hot values (v = identity)."""
    b, hkv, skv, _ = k.shape
    eye = torch.eye(skv, dtype=q.dtype).expand(b, hkv, skv, skv)
    return az.attention(q, k, eye, method=method, **kwargs)


def assert_matches_reference(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "torch",
    grads: tuple[torch.Tensor, ...] = (),
    return_lse: bool = False,
    **params: Any,
) -> None:
    """``backend`` equals the dense reference to 1e-10: the output, and the gradients with respect to ``q``, ``k``,
    ``v`` and the extra leaves ``grads`` for one random output gradient (the inputs must be fp64 autograd leaves).
    ``return_lse``: the log-sum-exp too (``-inf`` on the same rows), with a random gradient for it as well."""
    ref = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="reference",
                       return_lse=return_lse, **params)
    out = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend=backend,
                       return_lse=return_lse, **params)
    outs, refs = (out, ref) if return_lse else ((out,), (ref,))
    if return_lse:
        assert torch.equal(torch.isneginf(out[1]), torch.isneginf(ref[1]))
        outs, refs = (out[0], out[1].nan_to_num(neginf=0.0)), (ref[0], ref[1].nan_to_num(neginf=0.0))
    for a, b in zip(outs, refs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    cots = [torch.randn_like(r) for r in refs]
    inputs = (q, k, v, *grads)
    for a, b in zip(torch.autograd.grad(outs, inputs, cots), torch.autograd.grad(refs, inputs, cots), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def assert_lse_matches_reference(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
    mask: torch.Tensor | None = None, backend: str = "torch", **params: Any,
) -> None:
    """``return_lse=True`` of ``backend`` equals the reference's ``(out, lse)`` (:func:`assert_same_out_and_lse`)."""
    kw: dict[str, Any] = dict(method=method, causal=causal, mask=mask, return_lse=True, **params)
    got, want = az.attention(q, k, v, backend=backend, **kw), az.attention(q, k, v, backend="reference", **kw)
    assert_same_out_and_lse(got, want, (q, k, v))


def assert_same_out_and_lse(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
                            inputs: tuple[torch.Tensor, ...]) -> None:
    """``got`` equals ``want``, two ``(out, lse)`` pairs, to 1e-10 (``-inf`` on the same rows), and so do the
    gradients of ``⟨c_o, out⟩ + ⟨c_l, lse⟩`` with respect to ``inputs`` (fp64 leaves)."""
    empty = torch.isneginf(want[1])
    assert torch.equal(torch.isneginf(got[1]), empty), "lse is not -inf on exactly the rows that see no key"
    g = torch.Generator().manual_seed(11)
    cot_out = torch.randn(want[0].shape, generator=g, dtype=want[0].dtype)
    cot_lse = torch.randn(want[1].shape, generator=g, dtype=want[1].dtype)
    grads = []
    for out, lse in (got, want):
        torch.testing.assert_close(out, want[0], atol=1e-10, rtol=1e-10)
        lse = lse.masked_fill(empty, 0)
        torch.testing.assert_close(lse, want[1].masked_fill(empty, 0), atol=1e-10, rtol=1e-10)
        grads.append(torch.autograd.grad((out * cot_out).sum() + (lse * cot_lse).sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def assert_low_precision_close(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **params: Any) -> None:
    """fp32 and bf16 outputs of the torch path close to the fp64 reference, with finite gradients."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        got = az.attention(*x, method=method, backend="torch", **params)
        want = az.attention(q, k, v, method=method, backend="reference", **params)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        got.float().square().sum().backward()
        assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in x)


def token(params: dict[str, Any], t: int) -> dict[str, Any]:
    """The parameters of one decoding step: per-token ``(B, H, N)`` tensors sliced to position ``t``."""
    return {name: p[:, :, t : t + 1] if torch.is_tensor(p) and p.dim() == 3 else p for name, p in params.items()}


def decoding(method: str) -> SimpleNamespace:
    """``method``'s registered decoder on raw states (``.prefill``, ``.step``; ``state=None`` starts an empty
    sequence), its parameters validated as ``attnzoo.attention`` validates them: what ``attnzoo.prefill``/``step``
    run inside their :class:`~attnzoo.api.DecodeState`."""
    m = az.get(method)

    def prefill(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, **params: Any
    ) -> tuple[torch.Tensor, Any]:
        _, scale_, _, _, full = prepare(m, q, k, v, True, scale, None, None, params)
        return m.decoder.prefill(q, k, v, scale=scale_, **full)

    def step(
        state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, **params: Any
    ) -> tuple[torch.Tensor, Any]:
        _, scale_, _, _, full = prepare(m, q, k, v, True, scale, None, None, params)
        return m.decoder.step(state, q, k, v, scale=scale_, **full)

    return SimpleNamespace(prefill=prefill, step=step)


def decode_each_token(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, Any]
) -> tuple[torch.Tensor, Any]:
    """Run a linear method's ``step`` over every position from an empty state: the outputs, concatenated along the
    sequence, and the final state."""
    outs, state = [], None
    for t in range(q.shape[2]):
        o_t, state = module.step(state, *(x[:, :, t : t + 1] for x in (q, k, v)), **token(params, t))
        outs.append(o_t)
    return torch.cat(outs, dim=2), state


def with_gates(params: dict[str, Any], b: int, h: int, n: int) -> dict[str, Any]:
    """Replace the marker ``gates=True`` by random per-token gated-delta gates for a (b, h, n) call."""
    if not params.pop("gates", False):
        return params
    gen = torch.Generator().manual_seed(7)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(b, h, n, generator=gen, dtype=F64) + 2.0)
    return {**params, "log_gate": log_gate, "beta": torch.rand(b, h, n, generator=gen, dtype=F64)}


def eco_params(gen: torch.Generator, kv_heads: int = 2, d: int = 6, m: int = 7, bits: int = 5) -> dict[str, Any]:
    """Random EcoFormer hash parameters (anchors, hash weights, kernel means) drawn from ``gen``."""
    return {
        "anchors": torch.randn(kv_heads, m, d, generator=gen, dtype=F64),
        "hash_weight": torch.randn(kv_heads, bits, m, generator=gen, dtype=F64),
        "kernel_mean": 0.3 * torch.rand(kv_heads, m, generator=gen, dtype=F64),
    }


def assert_decodes(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], **params: Any,
) -> Any:
    """``attnzoo.prefill`` on right-padded prompts of ``lengths`` tokens, then one ``attnzoo.step`` per token, each
    sequence continuing from its own length to the end of ``q``: every output equals the causal forward (reference)
    over the whole sequence at that position. Returns the final state."""
    want = az.attention(q, k, v, method=method, causal=True, backend="reference", **params)
    prompt, n, batch = max(lengths), q.shape[2], q.shape[0]
    at = torch.tensor(lengths)
    out, state = az.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], method=method, lengths=at,
                            **params)
    for b, length in enumerate(lengths):
        torch.testing.assert_close(out[b, :, :length], want[b, :, :length])
    for t in range(n - prompt):
        index = at + t
        out, state = az.step(state, *(x[torch.arange(batch), :, index].unsqueeze(2) for x in (q, k, v)))
        for b in range(batch):
            torch.testing.assert_close(out[b, :, 0], want[b, :, index[b]])
    return state


def fit_losses(module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int,
               lr: float = 1e-2) -> list[float]:
    """Train ``module`` to map ``x`` to ``target`` (MSE, Adam at ``lr``) for ``steps`` steps; the loss before each."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(module(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
