"""``attnzoo.attention``, ``attnzoo.prefill`` and ``attnzoo.step``: one entry point for every registered method, and
one decoding API for every method that declares a :class:`~attnzoo.registry.Decoder`.

Everything about a call is checked here, before any compute, so that bad input gets one clear
:class:`~attnzoo.errors.AttnzooError` naming the argument instead of a wrong answer or a crash deep in a kernel.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from attnzoo.errors import AttnzooError, fail
from attnzoo.kv.cache import KVCache, check_lengths
from attnzoo.kv.presses.base import Press, PressContext
from attnzoo.registry import Backend, Call, Decoder, Method, decoding_methods, get, methods


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "softmax", causal: bool = False,
    scale: float | None = None, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    backend: str = "auto", return_lse: bool = False, **params: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, H, Sq, D)`` over ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)`` by ``method``.

    Returns ``(B, H, Sq, Dv)``; with ``return_lse=True``, ``(out, lse)``.

    - ``H % Hkv == 0`` (GQA/MQA); query head ``i`` reads key/value head ``i // (H // Hkv)``.
    - ``Sq != Skv`` is cross-attention. With ``causal=True`` the mask is aligned to the bottom-right: query ``i`` sees
      keys ``j <= i + Skv - Sq``, so the last query sees every key (as in decoding and FlashAttention >= 2.1).
    - ``mask``: boolean, broadcastable to ``(B, H, Sq, Skv)``, True = attend. ``bias``: additive float logits bias,
      same broadcasting. A query row with no visible key returns zeros (and zero gradients), never NaN.
    - ``scale`` defaults to ``1/sqrt(D)``.
    - ``backend``: ``"auto"`` picks the fastest registered path that can serve the call; a named backend that cannot
      serve it raises.
    - ``return_lse``: also return the natural-log log-sum-exp ``(B, H, Sq)`` of each row's visible logits, ``-inf``
      for a row that sees no key, differentiable like ``out``: what :func:`attnzoo.merge` needs to combine attention
      over disjoint key sets exactly. Served by the methods whose output is one softmax over each query's visible keys
      (``attnzoo.get(method).spec.lse``), from the backends that declare it.
    - ``**params``: the method's own parameters (see ``attnzoo.get(method).spec.params``).
    """
    m = get(method)
    call, scale_, mask_, bias_, full_params = prepare(m, q, k, v, causal, scale, mask, bias, params)
    if not isinstance(return_lse, bool):
        raise fail("return_lse", "a bool", repr(return_lse))
    if return_lse:
        if not m.spec.lse:
            with_lse = [n for n, spec in methods().items() if spec.lse]
            raise fail("return_lse", f"False for method {m.name!r}, whose output is not one softmax over its visible "
                       f"keys (methods that return a log-sum-exp: {', '.join(with_lse)})", True)
        call = replace(call, return_lse=True)
        full_params["return_lse"] = True
    chosen = select_backend(m, call, backend)
    return chosen.fn(q, k, v, causal=causal, scale=scale_, mask=mask_, bias=bias_, **full_params)


def prepare(
    m: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
    mask: torch.Tensor | None, bias: torch.Tensor | None, params: dict[str, Any], sequence: int | None = None,
) -> tuple[Call, float, torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """Validate a call; return its :class:`Call`, the resolved scale, 4-D mask/bias views and all parameters.

    ``sequence``: decoding, the tokens of the sequence so far (:attr:`attnzoo.registry.Call.sequence`)."""
    spec = m.spec
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise fail(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            raise fail(name, "a 4-D tensor (batch, heads, seq, head_dim)", f"shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise fail(name, "a floating-point tensor", t.dtype)
        if t.numel() == 0:
            raise fail(name, "non-empty dimensions", f"shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise fail(name, f"dtype {q.dtype} (that of q)", t.dtype)
        if t.device != q.device:
            raise fail(name, f"device {q.device} (that of q)", t.device)
    b, h, sq, d = q.shape
    if k.shape[0] != b:
        raise fail("k", f"batch {b} (from q)", k.shape[0])
    if v.shape[0] != b:
        raise fail("v", f"batch {b} (from q)", v.shape[0])
    hkv, skv = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise fail("k", f"head_dim {d} (from q)", k.shape[3])
    if v.shape[1] != hkv:
        raise fail("v", f"{hkv} heads (from k)", v.shape[1])
    if v.shape[2] != skv:
        raise fail("v", f"seq {skv} (from k)", v.shape[2])
    if h % hkv != 0:
        raise fail("k", f"a number of heads dividing q's {h} (GQA/MQA)", hkv)
    if not isinstance(causal, bool):
        raise fail("causal", "a bool", repr(causal))
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise fail("scale", "a positive finite number or None", repr(scale))
    mask = _check_mask_like("mask", mask, q, (b, h, sq, skv), spec.supports_mask, boolean=True)
    bias = _check_mask_like("bias", bias, q, (b, h, sq, skv), spec.supports_bias, boolean=False)

    requires_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, bias, *params.values())
    )
    unknown = [name for name in params if name not in {p.name for p in spec.params}]
    if unknown:
        known = [p.name for p in spec.params]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AttnzooError(f"{unknown[0]}: unknown parameter for method {spec.name!r} (it takes {known}){hint}")
    call = Call(
        batch=b, heads=h, kv_heads=hkv, seq_q=sq, seq_kv=skv, head_dim=d, head_dim_v=v.shape[3], causal=causal,
        device=q.device, dtype=q.dtype, requires_grad=requires_grad, has_mask=mask is not None,
        has_bias=bias is not None, params=params, sequence=sequence,
    )
    if call.pattern not in spec.patterns:
        raise fail(
            "causal" if call.causal else "k",
            f"a pattern method {spec.name!r} supports ({', '.join(sorted(spec.patterns))})",
            f"{call.pattern} (seq_q={sq}, seq_kv={skv}, causal={causal})",
        )
    full: dict[str, Any] = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        if isinstance(value, torch.Tensor) and value.device != q.device:
            raise fail(p.name, f"a tensor on {q.device} (the device of q)", value.device)
        full[p.name] = p.validate(value, call)
    if spec.differentiable is False and requires_grad:
        raise fail("q", f"tensors without requires_grad (method {spec.name!r} is inference-only)", "requires_grad")
    return call, float(scale), mask, bias, full


def _check_mask_like(
    name: str, t: torch.Tensor | None, q: torch.Tensor, target: tuple[int, int, int, int], supported: bool,
    boolean: bool,
) -> torch.Tensor | None:
    if t is None:
        return None
    if not supported:
        raise fail(name, "None (this method does not take one)", f"a {type(t).__name__}")
    if not isinstance(t, torch.Tensor):
        raise fail(name, "a torch.Tensor or None", type(t).__name__)
    if boolean and t.dtype != torch.bool:
        raise fail(name, "a bool tensor (True = attend)", t.dtype)
    if not boolean and t.dtype != q.dtype:
        raise fail(name, f"a float tensor of dtype {q.dtype} (that of q)", t.dtype)
    if t.device != q.device:
        raise fail(name, f"a tensor on {q.device} (the device of q)", t.device)
    if t.dim() > 4:
        raise fail(name, f"a tensor broadcastable to {target}", f"shape {tuple(t.shape)}")
    shaped = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    for have, want in zip(shaped.shape, target, strict=False):
        if have not in (1, want):
            raise fail(name, f"a tensor broadcastable to (batch, heads, seq_q, seq_kv) = {target}", tuple(t.shape))
    return shaped


def select_backend(m: Method, call: Call, backend: str) -> Backend:
    """The backend that serves ``call``: the named one (or an error saying why not), or the first that can.

    ``auto`` tries the method's backends from the highest priority on the call's device type down
    (:meth:`~attnzoo.registry.Method.by_priority`), each checked by :meth:`~attnzoo.registry.Backend.refusal`, and
    falls back to the dense reference only for methods that do not promise sub-quadratic memory.
    """
    if not isinstance(backend, str):
        raise fail("backend", "a backend name (str)", repr(backend))
    if backend != "auto":
        chosen = m.backend(backend)
        reason = chosen.refusal(call)
        if reason is not None:
            raise fail("backend", f"a backend that can serve this call ({backend!r} cannot: {reason})", repr(backend))
        return chosen
    reasons = []
    for b in m.by_priority(call.device.type):
        reason = b.refusal(call)
        if reason is None:
            return b
        reasons.append(f"{b.name}: {reason}")
    if not m.spec.subquadratic_memory:
        return m.backend("reference")
    raise fail("backend", f"a backend of {m.name!r} that can serve this call", "; ".join(reasons))


@dataclass(frozen=True, eq=False)
class DecodeState:
    """Where a decoded sequence stands: returned by :func:`prefill` and :func:`step`, passed to the next :func:`step`.

    It carries everything ``step`` needs, so ``step`` takes no method argument: the ``method`` name, the resolved
    ``scale``, the resolved ``params`` (all but the per-token ones, see ``token_params``), ``length`` (tokens seen),
    ``call`` (the prefill's validated call: batch, heads, head dims, dtype, device that every step must match) and
    ``data``, the method's own state (a recurrent tensor, a KV cache...). ``token_params`` names the per-token
    parameters the prefill was given as tensors: each step must pass its own token's. ``press`` (and the ``layer`` it
    sees) is applied after each step. Treat it as a value: ``step``
    returns a new one and never modifies the one it was given.
    """

    method: str
    scale: float
    params: Mapping[str, Any]
    length: int
    call: Call
    data: Any
    token_params: tuple[str, ...] = ()
    press: Press | None = None
    layer: int | None = None


def prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str, scale: float | None = None, *,
    lengths: torch.Tensor | None = None, press: Press | None = None, layer: int | None = None, **params: Any,
) -> tuple[torch.Tensor, DecodeState]:
    """Causal self-attention over a prompt, returning ``(out, state)`` to continue the sequence with :func:`step`.

    ``q (B, H, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; ``out`` is what ``attention(q, k, v,
    method=method, causal=True, scale=scale, **params)`` returns. ``method`` must declare decoding
    (``attnzoo.get(method).spec.decoding``). Arguments are validated exactly as :func:`attention` does.

    ``lengths (B,)``: the real tokens of each sequence, the rest right padding (their outputs are 0; each sequence
    continues from its own length). ``press``: a :class:`~attnzoo.kv.presses.Press` applied to the cache once the
    whole prompt has been attended, and after each step (methods that decode through a KV cache). ``layer``: the
    layer index the press sees (per-layer presses).
    """
    m = get(method)
    decoder = _decoder(m)
    call, scale_, _, _, full = prepare(m, q, k, v, True, scale, None, None, params, sequence=q.shape[2])
    _require_self(call)
    if lengths is not None:
        lengths = check_lengths(lengths, call.batch, call.seq_q, q.device)
    if decoder.kv_cache or lengths is None:
        extra = {} if lengths is None else {"lengths": lengths}
        out, data = decoder.prefill(q, k, v, scale=scale_, **full, **extra)
    else:
        out, data = _prefill_each(decoder, q, k, v, scale_, full, lengths)
    if lengths is not None:
        out = out.masked_fill(torch.arange(call.seq_q, device=q.device).view(1, 1, -1, 1)
                              >= lengths.view(-1, 1, 1, 1), 0)
    context = None
    if press is not None:
        _require_press_serves(press, data, m.name)
        context = PressContext(q, scale_, m.name, layer, "prefill")
        data = press.compress(data, context)
    given = tuple(n for n in decoder.token_params if isinstance(full[n], torch.Tensor))
    kept = {n: p for n, p in full.items() if n not in given}
    state = DecodeState(m.name, scale_, kept, call.seq_q, replace(call, params={}), data, given, press, layer)
    return out, state


def step(
    state: DecodeState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **params: Any,
) -> tuple[torch.Tensor, DecodeState]:
    """Continue a sequence by ``T >= 1`` tokens: ``q (B, H, T, D)``, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)``.

    Returns ``(out, state)`` with ``out (B, H, T, Dv)``: what one causal forward over the whole sequence gives for
    these ``T`` positions. The method, scale and parameters come from ``state``; ``params`` passes the per-token
    parameters of these tokens (``(B, H, T)`` gates, say), and must not change the others. ``T > 1`` runs the
    method's step once on the chunk if its decoder is ``chunked`` and no press is attached, else token by token (the
    state's press after each token).
    """
    if not isinstance(state, DecodeState):
        raise fail("state", "a DecodeState from attnzoo.prefill or attnzoo.step", type(state).__name__)
    if "scale" in params:
        raise fail("scale", "no value (the prefill's scale holds for the whole sequence)", params["scale"])
    m = get(state.method)
    decoder = _decoder(m)
    missing = [n for n in state.token_params if n not in params]
    if missing:
        raise fail(missing[0], f"this step's values (the prefill was given per-token {missing[0]})", "none")
    fixed = [n for n in params if n in state.params and n not in decoder.token_params]
    changed = [n for n in fixed if not _same(params[n], state.params[n])]
    if changed:
        raise fail(changed[0], "the prefill's value (only per-token parameters change per step)", "another value")
    call, _, _, _, full = prepare(m, q, k, v, True, state.scale, None, None, {**state.params, **params},
                                  sequence=state.length + q.shape[2])
    _require_self(call)
    _require_continues(state.call, call)
    data, outs = state.data, []
    whole = decoder.chunked and state.press is None  # a press sees one token per step, as its step() is written
    chunks = [(0, call.seq_q)] if whole else [(t, t + 1) for t in range(call.seq_q)]
    for a, b in chunks:
        part = {n: _tokens(p, a, b) if n in decoder.token_params else p for n, p in full.items()}
        q_t, k_t, v_t = (x[:, :, a:b] for x in (q, k, v))
        out, data = decoder.step(data, q_t, k_t, v_t, scale=state.scale, **part)
        if state.press is not None:
            data = state.press.step(data, PressContext(q_t, state.scale, m.name, state.layer, "step"))
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, replace(state, length=state.length + call.seq_q, data=data)


def _prefill_each(
    decoder: Decoder, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict[str, Any],
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, Any]:
    """Ragged prompts for a decoder with a fixed-size state: each sequence's prefill over its own tokens, the states
    stacked along the batch (exact: padding never enters a state)."""
    outs, states = [], []
    for b, n in enumerate(lengths.tolist()):
        one = {name: p[b : b + 1, ..., :n] if name in decoder.token_params and isinstance(p, torch.Tensor) else p
               for name, p in params.items()}
        out, data = decoder.prefill(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], scale=scale, **one)
        outs.append(F.pad(out, (0, 0, 0, q.shape[2] - n)))
        states.append(data)
    if not all(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(states[0])):
        raise fail("lengths", f"None: this method's decoding state ({type(states[0]).__name__}) cannot hold "
                   "sequences of different lengths", lengths.tolist())
    return torch.cat(outs), tree_map(lambda *parts: torch.cat(parts), states[0], *states[1:])


def _require_press_serves(press: Any, data: Any, method: str) -> None:
    if not isinstance(press, Press):
        raise fail("press", "a Press (attnzoo.kv.presses)", type(press).__name__)
    if not isinstance(data, KVCache):
        cached = ", ".join(n for n in decoding_methods() if get(n).decoder.kv_cache)  # type: ignore[union-attr]
        raise fail("press", f"a method that decodes through a KV cache ({cached})", f"{method!r}, whose state is "
                   f"{type(data).__name__}")


def _decoder(m: Method) -> Decoder:
    if m.decoder is None:
        raise fail("method", f"a method that decodes ({', '.join(decoding_methods())})", repr(m.name))
    return m.decoder


def _same(a: Any, b: Any) -> bool:
    """Whether a parameter passed to a step is the prefill's value (the same tensor, or an equal scalar)."""
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


def _require_self(call: Call) -> None:
    if call.cross:
        raise fail("k", f"as many tokens as q ({call.seq_q}) when decoding", call.seq_kv)


def _require_continues(before: Call, now: Call) -> None:
    """Every step must have the prefill's batch, heads, head dims, dtype and device."""
    for name, arg in (("batch", "q"), ("heads", "q"), ("head_dim", "q"), ("kv_heads", "k"), ("head_dim_v", "v"),
                      ("dtype", "q"), ("device", "q")):
        if getattr(now, name) != getattr(before, name):
            raise fail(arg, f"{name} {getattr(before, name)} (that of the prefill)", getattr(now, name))


def _tokens(value: Any, start: int, stop: int) -> Any:
    """Tokens ``start:stop`` of a per-token parameter (its last dim); a scalar is the same for every token."""
    return value[..., start:stop] if isinstance(value, torch.Tensor) else value
