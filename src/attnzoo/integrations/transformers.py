"""attnzoo methods as Hugging Face transformers attention implementations (the ``hf`` extra).

>>> import attnzoo.integrations.transformers as azhf
>>> azhf.configure(model, method="sliding_window", window=256)     # or: azhf.register(), then
>>> model.generate(...)                                             # attn_implementation="attnzoo_sliding_window"

The contact surface with transformers is its public attention interface, nothing else:

- ``AttentionInterface.register("attnzoo_<method>", fn)``: a model whose ``attn_implementation`` is that name calls
  ``fn(module, query (B, H, Sq, D), key (B, Hkv, Skv, D), value, attention_mask, dropout=, scaling=, is_causal=,
  **kwargs)`` after RoPE and the cache update (keys not repeated for GQA) and expects ``(out (B, Sq, H, D), None)``.
  ``fn`` calls :func:`attnzoo.attention` with ``causal`` = the module's ``is_causal`` (attnzoo's causal mask is
  aligned bottom-right, so a decoding query over the cache's keys sees them all).
- ``AttentionMaskInterface.register("attnzoo_<method>", sdpa_mask)``: the model then builds the same boolean mask
  (``(B, 1, Sq, Skv)``, True = attend, None when plain causal or full) as for its own ``sdpa``; without a registered
  mask function transformers passes None and padding would be silently ignored.
- ``model.set_attn_implementation(name)`` (by :func:`configure`) and the attention modules' public attributes
  ``layer_idx``, ``is_causal`` and ``config`` (head counts).

Which method and parameters a layer uses: :func:`configure` sets them per attention module (its ``attnzoo_settings``
attribute: a :class:`LayerSetting` per attnzoo implementation name, so switching ``attn_implementation`` back and forth
keeps each configuration), validated at once, so a method that cannot serve the model's call fails there, not at
the first batch. A model set up only by name (``from_pretrained(..., attn_implementation="attnzoo_sliding_window")``
after :func:`register`) uses that method with the parameters in ``config.attnzoo_params`` (a dict; defaults if absent),
checked at the first call.

Masks: a method that takes masks gets the model's mask as is. A method that takes none (linear attention, say) is
served when the mask only says padding (and causality): each sequence is attended over its own real tokens, a
contiguous span of the keys (left padding for decoders, right padding for encoders); any other mask is refused.

Decoding inside ``generate()``: methods whose masks are aligned bottom-right read the cache's keys like softmax. A
method that decodes through a fixed-size state (the linear family: ``spec.decoding`` without a KV cache) keeps an
:class:`attnzoo.DecodeState` on each attention module: the prefill (``Sq == Skv``) builds it with
:func:`attnzoo.prefill`, and a call with ``Skv`` = the state's length + ``Sq`` continues it with :func:`attnzoo.step`
on the new tokens' keys and values only (the cache still holds every key; the state makes decoding O(1) per token;
within :func:`decoding` the state is the cache, and nothing else is held). A call whose cache length does not continue
the state (a cropped or reordered cache: beam search, assisted decoding) is refused rather than answered wrong.

Attnzoo's own decoding states as the model's cache (:func:`decoding`): the model's cache becomes a
:class:`~attnzoo.integrations.hf_cache.PressedCache`, a transformers ``Cache`` whose layers each hold the
:class:`attnzoo.DecodeState` of the layer's method (a ring of ``window + 1`` slots for ``sliding_window``, a
fixed-size state for linear methods, a ``KVCache`` for the softmax family), so the model holds what attnzoo holds and
nothing else; the attention function prefills and steps each layer's state (see :func:`attend_pressed`). Presses
(:func:`press`) are the same with the KV caches compressed by the press, so the memory the model holds really
shrinks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

import attnzoo
from attnzoo.errors import AttnzooError, fail
from attnzoo.kv.presses.base import Press
from attnzoo.registry import SELF_PATTERNS, Method, all_methods, decoding_methods, get, pattern_of

if TYPE_CHECKING:
    from attnzoo.integrations.hf_cache import PressedCache, PressedLayer

PREFIX = "attnzoo_"
EXTRA = 'pip install -e ".[hf]"'


def require_transformers() -> Any:
    """The ``transformers`` module; an :class:`AttnzooError` naming the extra to install if it is missing."""
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise fail("transformers", f"the package installed (the hf extra: {EXTRA})", "no module") from error


def servable(m: Method) -> bool:
    """Whether ``m`` can serve a model's self-attention (it has a self pattern, causal or not)."""
    return bool(SELF_PATTERNS & m.spec.patterns)


def register() -> list[str]:
    """Register ``attnzoo_<method>`` (attention and mask functions) for every method that can serve self-attention.

    Idempotent. Returns the registered names, in catalogue order.
    """
    transformers = require_transformers()
    masking = importlib.import_module("transformers.masking_utils")
    names = []
    for m in all_methods():
        if servable(m):
            name = PREFIX + m.name
            transformers.AttentionInterface.register(name, attention_function(m.name))
            masking.AttentionMaskInterface.register(name, masking.sdpa_mask)
            names.append(name)
    return names


@dataclass(frozen=True)
class LayerSetting:
    """What one attention module computes under ``attn_implementation="attnzoo_<m>"``: ``method`` (``m`` itself, or
    ``softmax`` for a layer :func:`configure` left out) and its ``params``."""

    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class DecodeTie:
    """A module's decoding state and the cache length it stands for (the tie to the transformers cache)."""

    state: attnzoo.DecodeState
    seq_kv: int


def attention_function(method: str) -> Any:
    """The transformers attention function of ``method`` (what :func:`register` registers)."""
    get(method)

    def attnzoo_attention(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
        is_causal: bool | None = None, **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        setting = layer_setting(module, method)
        name, params = setting.method, setting.params
        if dropout:
            raise fail("dropout", f"0 (attnzoo methods have no attention dropout; method {name!r})", dropout)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        out = attend(module, get(name), query, key, value, attention_mask, causal, scaling, params)
        return out.transpose(1, 2).contiguous(), None

    attnzoo_attention.__name__ = attnzoo_attention.__qualname__ = f"attnzoo_{method}_attention"
    return attnzoo_attention


def layer_setting(module: torch.nn.Module, method: str) -> LayerSetting:
    """What ``module`` computes under ``attn_implementation="attnzoo_<method>"``: its :func:`configure` setting, or
    ``method`` with the parameters in ``config.attnzoo_params`` (a model set up by name)."""
    setting = getattr(module, "attnzoo_settings", {}).get(method)
    if setting is None:
        setting = LayerSetting(method, dict(getattr(getattr(module, "config", None), "attnzoo_params", None) or {}))
    return setting


def attend(
    module: torch.nn.Module, m: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    causal: bool, scale: float | None, params: dict[str, Any],
) -> torch.Tensor:
    """``(B, H, Sq, Dv)``: one attention call of a model, by method ``m``."""
    if mask is not None and mask.dtype != torch.bool:
        raise fail("attention_mask", "a boolean mask (from the mask function attnzoo registers)", mask.dtype)
    layer = pressed_layer(module, k)
    if layer is not None:
        return attend_pressed(module, layer, m, q, mask, scale, params)
    if decodes_through_state(m, causal, q):
        return attend_with_state(module, m, q, k, v, mask, scale, params)
    if causal and q.shape[2] != k.shape[2] and "cross/causal" not in m.spec.patterns:
        raise fail("cache", f"none (method {m.name!r} neither reads a cache, pattern cross/causal, nor decodes through "
                   "a state: generate with use_cache=False)", f"{q.shape[2]} queries over {k.shape[2]} keys")
    if mask is None or m.spec.supports_mask:
        return attnzoo.attention(q, k, v, method=m.name, causal=causal, mask=mask, scale=scale, **params)
    start, stop = padding_spans(mask, causal, m.name)
    offset = k.shape[2] - q.shape[2]
    out = q.new_zeros(*q.shape[:3], v.shape[3])
    for b, (a, e) in enumerate(zip(start.tolist(), stop.tolist())):
        qa, qe = max(a - offset, 0), e - offset
        if qe > qa:
            out[b, :, qa:qe] = attnzoo.attention(
                q[b : b + 1, :, qa:qe], k[b : b + 1, :, a:e], v[b : b + 1, :, a:e], method=m.name, causal=causal,
                scale=scale, **params,
            )[0]
    return out


def padding_spans(mask: torch.Tensor, causal: bool, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's real keys ``[start, stop)`` from a ``(B, 1, Sq, Skv)`` mask that only says padding (and
    causality, aligned bottom-right); any other mask raises, naming ``method`` (which takes no mask)."""
    sq, skv = mask.shape[-2:]
    real = mask[:, 0].any(dim=-2)
    count = real.sum(-1)
    start = torch.where(count > 0, real.int().argmax(-1), 0)
    stop = start + count
    j = torch.arange(skv, device=mask.device)
    span = (j >= start[:, None]) & (j < stop[:, None])
    expected = span[:, None, None, :]
    if causal:
        i = torch.arange(sq, device=mask.device)
        expected = expected & (j[None, :] <= i[:, None] + skv - sq)
    if not torch.equal(span, real) or not torch.equal(mask, expected.expand_as(mask)):
        raise fail("attention_mask", f"padding only, one span of real tokens per sequence (method {method!r} takes "
                   "no mask)", "another pattern (sliding window, packed sequences...)")
    return start, stop


def decodes_through_state(m: Method, causal: bool, q: torch.Tensor) -> bool:
    """Whether a call runs through ``attnzoo.prefill``/``step``: a causal, gradient-free call of a method that
    decodes through a fixed-size state, or through its own KV cache when it cannot read transformers' cache (no
    ``cross/causal`` pattern: momentum, URPE, neighbourhoods, ... — the transformers cache then holds the keys too;
    :func:`decoding` avoids that copy)."""
    if not causal or m.decoder is None or m.decoder.token_params or (torch.is_grad_enabled() and q.requires_grad):
        return False
    return not m.decoder.kv_cache or "cross/causal" not in m.spec.patterns


def attend_with_state(
    module: torch.nn.Module, m: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scale: float | None, params: dict[str, Any],
) -> torch.Tensor:
    """Prefill (``Sq == Skv``: a new state on ``module``) or decoding steps (the state continued by the new tokens)."""
    sq, skv = q.shape[2], k.shape[2]
    if sq == skv:
        out, state = prefill_padded(m, q, k, v, mask, scale, params)
    else:
        tie = getattr(module, "attnzoo_decode", None)
        if tie is None or tie.seq_kv != skv - sq or tie.state.call.batch != q.shape[0]:
            seen = "none" if tie is None else f"a state for {tie.seq_kv} tokens, batch {tie.state.call.batch}"
            raise fail("cache", f"the keys of the prefill and steps so far, plus {sq} new (method {m.name!r} decodes "
                       f"through a state: no cropped or reordered cache)", f"{skv} keys, {seen}")
        out, state = attnzoo.step(tie.state, q, k[:, :, -sq:], v[:, :, -sq:])
    module.attnzoo_decode = DecodeTie(state, skv)
    return out


def pressed_layer(module: torch.nn.Module, k: torch.Tensor) -> PressedLayer | None:
    """The :class:`~attnzoo.integrations.hf_cache.PressedLayer` whose update gave this call's keys ``k``, or None
    when the call is not served by one (no :func:`decoding` or :func:`press`, or a call without a cache)."""
    pressing: Decoding | None = getattr(module, "attnzoo_press", None)
    if pressing is None or pressing.cache is None:
        return None
    layers = pressing.cache.layers
    layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
    if layer is None or layer.pending is None or layer.pending[0] is not k:
        raise fail("cache", f"the keys the pressed cache's layer {module.layer_idx} was just updated with",
                   "other keys (the attention module did not update the cache it was given)")
    return layer


def attend_pressed(
    module: torch.nn.Module, layer: PressedLayer, m: Method, q: torch.Tensor, mask: torch.Tensor | None,
    scale: float | None, params: dict[str, Any],
) -> torch.Tensor:
    """One call through a pressed cache layer: its first call prefills the layer's state (left padding shifted away,
    the press, if any, compressing the prompt's cache), later ones continue it by the new tokens (the press's
    ``step`` after each). The layer stores the state; nothing else keeps the keys. After the prompt the model's mask
    is not read: the state says what each query sees (a KV cache's positions: every kept token of its own sequence
    that the method shows it; a fixed-size state: the sequence so far)."""
    pressing: Decoding = module.attnzoo_press
    k, v = layer.take()
    if layer.state is None:
        out, state = prefill_padded(m, q, k, v, mask, scale, params, pressing.press, module.layer_idx)
    else:
        out, state = attnzoo.step(layer.state, q, k, v)
    layer.state = state
    pressing.record(module.layer_idx, layer)
    return out


def prefill_padded(
    m: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
    params: dict[str, Any], press: Press | None = None, layer: int | None = None,
) -> tuple[torch.Tensor, attnzoo.DecodeState]:
    """``attnzoo.prefill`` of a padded prompt: left-padded sequences are shifted to the front (right padding, which
    ``prefill`` takes as ``lengths``), and their outputs shifted back. Each sequence's positions in the state count
    from its first real token, as ``generate()``'s position ids do."""
    if mask is None:
        return attnzoo.prefill(q, k, v, method=m.name, scale=scale, press=press, layer=layer, **params)
    start, stop = padding_spans(mask, True, m.name)
    seq = q.shape[2]
    index = (torch.arange(seq, device=q.device) + start[:, None]) % seq
    out, state = attnzoo.prefill(*(shift(x, index) for x in (q, k, v)), method=m.name, scale=scale,
                                 lengths=stop - start, press=press, layer=layer, **params)
    return shift(out, (torch.arange(seq, device=q.device) - start[:, None]) % seq), state


def shift(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, H, S, D)`` with each sequence's tokens reordered by ``index (B, S)``."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that call the attention interface: those with ``layer_idx`` and ``is_causal``."""
    return [x for x in model.modules() if hasattr(x, "layer_idx") and hasattr(x, "is_causal")]


def configure(
    model: torch.nn.Module, method: str, layers: Iterable[int] | None = None, **params: Any,
) -> torch.nn.Module:
    """Make ``model`` attend by attnzoo's ``method`` with ``params``, in ``layers`` (their ``layer_idx``; None = all;
    the others attend by ``softmax``, which is what ``sdpa`` computes). Returns ``model``.

    Everything is checked here: the method must support each layer's pattern (``self/causal`` for a decoder,
    ``self/noncausal`` for an encoder, ``cross/noncausal`` for cross-attention), be trainable if the model is in
    training mode, and take ``params`` (names and values).
    """
    register()
    m = get(method)
    modules = attention_modules(model)
    if not modules:
        raise fail("model", "a transformers model whose attention modules have layer_idx and is_causal",
                   type(model).__name__)
    known = {x.layer_idx for x in modules}
    chosen = known if layers is None else set(layers)
    if not chosen <= known:
        raise fail("layers", f"layer indices of the model ({sorted(known)})", sorted(chosen - known))
    check_params(m, params)
    for x in modules:
        if x.layer_idx in chosen:
            check_serves(m, x, model)
    for x in modules:
        setting = LayerSetting(m.name, dict(params)) if x.layer_idx in chosen else LayerSetting("softmax", {})
        x.attnzoo_settings = {**getattr(x, "attnzoo_settings", {}), m.name: setting}
        x.attnzoo_decode = None
    model.set_attn_implementation(PREFIX + m.name)
    return model


def check_params(m: Method, params: dict[str, Any]) -> None:
    """Each of ``params`` is a parameter of ``m`` with a valid value (checks needing a call's shapes come later)."""
    for name, value in params.items():
        try:
            p = m.spec.param(name)
        except KeyError:
            raise AttnzooError(f"{name}: unknown parameter for method {m.name!r} (it takes "
                               f"{[p.name for p in m.spec.params]})") from None
        p.validate(value)


def check_serves(m: Method, module: torch.nn.Module, model: torch.nn.Module) -> None:
    """Raise if ``m`` cannot serve ``module``'s attention: its pattern, training, dropout while training."""
    cross = "cross" in type(module).__name__.lower()
    pattern = pattern_of(cross, bool(module.is_causal))
    where = f"{type(module).__name__} of layer {module.layer_idx}"
    if pattern not in m.spec.patterns:
        raise fail("method", f"a method supporting the {pattern} pattern of {where}",
                   f"{m.name!r} (patterns: {', '.join(sorted(m.spec.patterns))})")
    if model.training and m.spec.differentiable is False:
        raise fail("method", f"a trainable method ({type(model).__name__} is in training mode; call model.eval() "
                   "for inference)", f"{m.name!r} (inference-only)")
    config = getattr(module, "config", None)
    dropout = getattr(config, "attention_dropout", 0.0) or getattr(config, "attention_probs_dropout_prob", 0.0)
    if model.training and dropout:
        raise fail("model", f"eval mode or attention dropout 0 (attnzoo methods have none; method {m.name!r})",
                   f"training with attention dropout {dropout}")


@dataclass
class Decoding:
    """A :func:`decoding` (or :func:`press`) in progress: the ``press`` (None: the methods' own decoding states,
    uncompressed), whether it is ``active`` (the block is running), the ``cache`` the latest call used (a
    :class:`~attnzoo.integrations.hf_cache.PressedCache`, or None after a call without a cache), and per layer, after
    the latest call, ``full_bytes`` (what transformers' own ``DynamicCache`` would hold for the same tokens: every
    column's keys and values) and ``pressed_bytes`` (what the model's cache really holds: the layer's attnzoo state,
    storage capacity and positions included)."""

    press: Press | None
    active: bool = True
    cache: PressedCache | None = None
    full_bytes: dict[int, int] = field(default_factory=dict)
    pressed_bytes: dict[int, int] = field(default_factory=dict)

    def record(self, layer: int, held: PressedLayer) -> None:
        self.full_bytes[layer] = held.full_nbytes
        self.pressed_bytes[layer] = held.nbytes

    @property
    def ratio(self) -> float:
        """Bytes the model's caches hold over those of the full ones (all layers)."""
        return sum(self.pressed_bytes.values()) / max(sum(self.full_bytes.values()), 1)


@contextmanager
def press(model: torch.nn.Module, press: Press) -> Iterator[Decoding]:
    """Within the block, ``model``'s KV cache is an attnzoo cache compressed by ``press``: its memory really shrinks.

    ``with azhf.press(model, SnapKVPress(compression_ratio=0.5)) as pressed: model.generate(...)``; then
    ``pressed.full_bytes`` / ``pressed.pressed_bytes`` give each layer's cache bytes without and with the press, and
    ``pressed.cache`` is the cache the model held (``generate(..., return_dict_in_generate=True)`` returns it too).

    :func:`decoding` with a press: the prompt runs ``attnzoo.prefill(..., press=press, layer=layer_idx)`` (left
    padding shifted away, so each sequence's positions stay its true positions after compression), each later token
    ``attnzoo.step`` (the press's ``step`` after it). Per-head budgets (``AdaKVPress``: a ragged cache) and
    decoding-time presses (``DecodingPress``) work the same way. Refused besides what :func:`decoding` refuses: layers
    attending by a method that does not decode through a KV cache.
    """
    if not isinstance(press, Press):
        raise fail("press", "a Press (attnzoo.kv.presses)", type(press).__name__)
    with decoding(model, press) as pressing:
        yield pressing


@contextmanager
def decoding(model: torch.nn.Module, press: Press | None = None) -> Iterator[Decoding]:
    """Within the block, ``model``'s cache is attnzoo's own decoding state, layer by layer, and nothing else.

    ``with azhf.decoding(model) as dec: model.generate(...)``: a ``sliding_window`` layer holds its ring of
    ``window + 1`` slots (constant memory as generation goes on), a linear-family layer (``linear``, ``lightning``,
    ``hedgehog``, ...) its fixed-size state, a softmax-family layer its ``KVCache``, and methods that cannot read
    transformers' cache (``momentum``, ``urpe``, ``neighborhood``, ...) their own cache, with no copy of the keys
    beside it. ``dec.cache`` is the cache the latest call used (``azhf.cache_bytes(dec.cache)`` its bytes);
    ``dec.pressed_bytes`` / ``dec.full_bytes`` give each layer's bytes held and what a ``DynamicCache`` would hold.
    ``press``: compress the KV caches too (what :func:`press` does).

    A forward pre-hook on ``model`` (PyTorch's ``register_forward_pre_hook``) gives each gradient-free call that
    would start a cache (``cache``/``past_key_values`` None with ``use_cache``, or the empty ``DynamicCache`` that
    ``generate()`` creates) a :class:`~attnzoo.integrations.hf_cache.PressedCache` instead; a call may also continue
    one from an earlier call within the block. Each layer of it holds an :class:`attnzoo.DecodeState`: the prompt runs
    ``attnzoo.prefill`` (left padding shifted away), each later token ``attnzoo.step`` (see :func:`attend_pressed`).
    A model not on an attnzoo implementation attends by ``softmax`` within the block, and gets its implementation
    back after it. Refused: layers attending by a method that does not decode (or needs per-token parameters),
    sliding-window layers of the model itself (``sliding_window`` in its config), a call given another non-empty
    cache, and (by the cache) beam search and rollbacks.
    """
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not str(before).startswith(PREFIX):
        configure(model, "softmax")
    name = model.config._attn_implementation.removeprefix(PREFIX)
    modules = attention_modules(model)
    for x in modules:
        setting = layer_setting(x, name)
        if x.is_causal:
            check_decodes(get(setting.method), x.layer_idx, press)
        if getattr(x, "sliding_window", None) is not None:
            under = "a press" if press is not None else "attnzoo decoding"
            raise fail("model", f"full-attention layers under {under} (its cache keeps what the method and press "
                       "keep; configure the sliding_window method instead)",
                       f"layer {x.layer_idx} with a sliding window of {x.sliding_window}")
    pressing = Decoding(press)

    hook = model.register_forward_pre_hook(partial(use_pressed_cache, pressing), with_kwargs=True)
    for x in modules:
        x.attnzoo_press, x.attnzoo_decode = pressing, None
    try:
        yield pressing
    finally:
        hook.remove()
        pressing.active = False
        for x in modules:
            x.attnzoo_press, x.attnzoo_decode = None, None
        if not str(before).startswith(PREFIX):
            model.set_attn_implementation(before)


def check_decodes(method: Method, layer: int, press: Press | None) -> None:
    """Raise if a causal layer attending by ``method`` cannot keep its cache as an attnzoo decoding state: the method
    must decode without per-token parameters (a model's call passes none per token), through a KV cache under a
    ``press``."""
    if press is not None and (method.decoder is None or not method.decoder.kv_cache):
        cached = ", ".join(n for n in decoding_methods() if get(n).decoder.kv_cache)
        raise fail("press", f"a model attending by a method that decodes through a KV cache ({cached})",
                   f"layer {layer} attending by {method.name!r}")
    if method.decoder is None or method.decoder.token_params:
        able = ", ".join(n for n in decoding_methods() if not get(n).decoder.token_params)
        raise fail("method", f"a method that decodes without per-token parameters ({able})",
                   f"layer {layer} attending by {method.name!r}")


def use_pressed_cache(
    pressing: Decoding, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The forward pre-hook of :func:`decoding`: a call that would start a cache gets a new pressed cache (a
    gradient-free call with ``use_cache``, given no cache or ``generate()``'s empty ``DynamicCache``); a call given a
    pressed cache continues it; any other cache is refused. ``pressing.cache`` is the call's pressed cache (or None)."""
    from attnzoo.integrations.hf_cache import PressedCache

    key = "past_key_values" if "past_key_values" in kwargs else "cache"
    given = kwargs.get(key)
    if given is None or (isinstance(given, require_transformers().DynamicCache) and given.get_seq_length() == 0):
        use = kwargs.get("use_cache")
        use = getattr(model.config, "use_cache", False) if use is None else use
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        if not use or trains:
            pressing.cache = None
            return args, kwargs
        given = kwargs[key] = PressedCache(pressing)
    if not isinstance(given, PressedCache):
        raise fail("cache", "None, an empty DynamicCache (what generate() starts with) or the cache of an earlier "
                   "pressed call (or call within azhf.decoding)",
                   f"a {type(given).__name__} of {given.get_seq_length()} tokens")
    given.pressing = pressing
    pressing.cache = given
    return args, kwargs


def cache_bytes(cache: Any) -> int:
    """Bytes a transformers cache holds: a pressed cache's attnzoo caches (``nbytes`` of each layer), or the keys and
    values tensors of any other cache's layers (a ``DynamicCache``)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes
            continue
        held = (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    return total
