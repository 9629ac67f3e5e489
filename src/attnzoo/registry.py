"""The method registry: every mechanism registers a :class:`MethodSpec`, its reference, its fast paths and, if it
decodes, its recurrent form.

A method file ends with one ``register(...)`` call. The API, the CLI, the benchmark and the conformance suite all
walk this registry, so a new method is tested, listed and benchmarked without new code elsewhere.

- :data:`FAMILIES`: the catalogue's families (letter, name, title, folder), in the order of docs/methods.md.
- :class:`Backend`: one implementation of a method, declaring what it serves (devices, dtypes, training, exact or
  approximate within a tolerance) and its priority per device type, which ``backend="auto"`` sorts by.
  :func:`register_backend` adds one to a registered method from anywhere (a package outside attnzoo, say).
- :class:`Decoder`: a method's ``prefill``/``step`` pair, behind ``attnzoo.prefill`` and ``attnzoo.step``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnzoo.errors import AttnzooError, fail

PATTERNS: tuple[str, ...] = ("self/noncausal", "self/causal", "cross/noncausal", "cross/causal")
ALL_PATTERNS = frozenset(PATTERNS)
SELF_PATTERNS = frozenset({"self/noncausal", "self/causal"})
NONCAUSAL_PATTERNS = frozenset({"self/noncausal", "cross/noncausal"})


@dataclass(frozen=True)
class Family:
    """A family of the catalogue: ``letter`` prefixes its IDs (``L10``), ``name`` is what specs say (``"linear"``),
    ``title`` is the catalogue's heading, ``folder`` where its files live under ``attnzoo/``."""

    letter: str
    name: str
    title: str
    folder: str


# The catalogue's families, in its order (which is the order of ``attnzoo list`` and docs/methods.md). D, H, Q,
# K and C have no registered method yet; their names and folders are reserved here.
FAMILIES: tuple[Family, ...] = (
    Family("S", "softmax", "softmax-form variants", "methods/softmax"),
    Family("P", "structured", "static structured sparsity", "methods/structured"),
    Family("D", "sparse", "dynamic, content-dependent sparsity", "methods/sparse"),
    Family("L", "linear", "linear, kernelised and recurrent attention", "methods/linear"),
    Family("H", "heads", "head structure and projections", "methods/heads"),
    Family("Q", "precision", "low-precision attention", "methods/precision"),
    Family("K", "kv", "KV cache and inference", "kv"),
    Family("C", "analysis", "analysis of attention in any model", "analysis"),
)


def family(name: str) -> Family:
    """The family called ``name`` (``"linear"``); an unknown name raises, listing the known ones."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise fail("family", f"one of {[f.name for f in FAMILIES]}", repr(name))


def pattern_of(cross: bool, causal: bool) -> str:
    """The CAB pattern name for a call: ``self``/``cross`` × ``causal``/``noncausal``."""
    return f"{'cross' if cross else 'self'}/{'causal' if causal else 'noncausal'}"


@dataclass(frozen=True)
class Shape:
    """The sizes of a call: ``q (batch, heads, seq_q, head_dim)``, ``k (batch, kv_heads, seq_kv, head_dim)``,
    ``v (batch, kv_heads, seq_kv, head_dim_v)``."""

    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int


@dataclass(frozen=True)
class Call(Shape):
    """What a backend or a parameter check may know about a call, before any compute: its :class:`Shape` and these.

    ``sequence``: set when decoding (``attnzoo.prefill``/``attnzoo.step``): the tokens of the decoded sequence so far,
    these included; the sequence may go on, so a check of a sequence-level parameter (a layout, a kernel size) reads
    :attr:`length`, and a layout may be larger than the tokens seen so far (a prompt is a prefix of the grid).
    ``return_lse``: the caller asked for the row log-sum-exp too (``attnzoo.attention(..., return_lse=True)``); only
    backends that declare ``lse`` serve it.
    """

    causal: bool
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    has_mask: bool
    has_bias: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    sequence: int | None = None
    return_lse: bool = False

    @property
    def decoding(self) -> bool:
        return self.sequence is not None

    @property
    def length(self) -> int:
        """The sequence's length: the tokens decoded so far, else ``seq_q``."""
        return self.seq_q if self.sequence is None else self.sequence

    @property
    def cross(self) -> bool:
        return self.seq_q != self.seq_kv

    @property
    def pattern(self) -> str:
        return pattern_of(self.cross, self.causal)


@dataclass(frozen=True)
class LayerInfo:
    """What an ``nn`` layer tells a learnable parameter's initialiser (and a paper layer's parts, which also read the
    model width ``dim``)."""

    heads: int
    kv_heads: int
    head_dim: int
    params: Mapping[str, Any]
    dim: int = 0


Check = Callable[[Any, Call], "str | None"]


@dataclass(frozen=True)
class Param:
    """A typed method parameter with its default and validation.

    ``types`` lists accepted Python types (``torch.Tensor`` among them for tensor-valued parameters). ``low``/``high``
    bound numbers (``low_open`` makes the lower bound strict). ``choices`` restricts to a set. ``check`` validates
    against the call (shapes of tensor parameters, say) and returns a message saying what was expected, or None.
    ``init`` marks a learnable parameter: the ``nn`` layer creates it as an ``nn.Parameter`` from ``init(layer)``.
    ``required``: the caller must give a value (``default`` is None; a missing value raises, naming the parameter) —
    for parameters with no sensible default, such as ``block_sparse``'s ``selection``.
    """

    name: str
    types: tuple[type, ...]
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    check: Check | None = None
    init: Callable[[LayerInfo], torch.Tensor] | None = None
    required: bool = False

    def validate(self, value: Any, call: Call | None = None) -> Any:
        """Return ``value`` if valid for this parameter, else raise :class:`AttnzooError` naming it."""
        if value is None:
            if self.default is None and not self.required:
                return None
            raise fail(self.name, self.describe_type(), "None")
        if isinstance(value, bool) and bool not in self.types:
            raise fail(self.name, self.describe_type(), f"bool {value!r}")
        if not isinstance(value, self.types) and not (float in self.types and isinstance(value, int)):
            raise fail(self.name, self.describe_type(), f"{type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise fail(self.name, f"one of {list(self.choices)}", repr(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise fail(self.name, "a finite number", value)
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise fail(self.name, f"{'>' if self.low_open else '>='} {self.low}", value)
            if self.high is not None and value > self.high:
                raise fail(self.name, f"<= {self.high}", value)
        if self.check is not None and call is not None:
            problem = self.check(value, call)
            if problem is not None:
                raise fail(self.name, problem, _short(value))
        return value

    def describe_type(self) -> str:
        names = [t.__name__ if t is not torch.Tensor else "Tensor" for t in self.types]
        return " or ".join(names) + (" or None" if self.default is None and not self.required else "")

    def invalid_examples(self) -> list[Any]:
        """Values this parameter must reject (used by the conformance suite)."""
        bad: list[Any] = ["not-a-value"] if str not in self.types else []
        if self.required:
            bad.append(None)
        if self.low is not None:
            bad.append(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            bad.append(self.high + 1)
        return bad


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


Serves = Callable[[Call], "str | None"]


def always(_: Call) -> str | None:
    return None


@dataclass(frozen=True)
class Tolerance:
    """How far an approximate backend may be from the method's reference: ``|got − ref| <= atol + rtol·|ref|``."""

    atol: float
    rtol: float


# ``auto`` tries a method's backends from the highest priority down. Built-in backend names get these defaults (a
# backend may declare its own per device type); any other name defaults to 0, after them. On CPU ``torch`` comes
# before ``flex``: CPU FlexAttention compiles for seconds per new shape and, measured here, beats the blockwise torch
# paths only narrowly where it wins at all (and loses 4x on 2-D neighborhoods).
DEFAULT_PRIORITY: Mapping[str, int] = {"triton": 40, "sdpa": 30, "flex": 20, "torch": 10}
CPU_DEFAULT_PRIORITY: Mapping[str, int] = {**DEFAULT_PRIORITY, "torch": 20, "flex": 10}


@dataclass(frozen=True)
class Backend:
    """One implementation of a method, and what it declares it serves.

    - ``fn(q, k, v, *, causal, scale, mask, bias, **params)``: called with validated inputs and every parameter.
    - ``serves(call)``: why it cannot serve a call (shapes, parameters...), or None if it can.
    - ``devices``: device types it runs on (``("cuda",)``), None for any; ``dtypes``: input dtypes, None for any;
      ``differentiable``: whether it has a backward (False: it refuses calls that need gradients). These generic
      declarations are checked before ``serves`` (see :meth:`refusal`).
    - ``exact``: whether it matches the method's reference to float tolerance; an approximate backend (a quantised
      kernel of an exact method, say) gives its ``tolerance`` against the reference instead, and the conformance
      suite holds it to that.
    - ``priority``: per device type (``{"cpu": 5, "cuda": 50}``); ``auto`` tries higher first. A device type it
      does not name gets :data:`DEFAULT_PRIORITY` (:data:`CPU_DEFAULT_PRIORITY` on CPU) for its name, else 0.
    - ``lse``: ``fn`` also takes ``return_lse=True`` and then returns ``(out, lse)``, the natural-log log-sum-exp
      ``(B, H, Sq)`` of each row's visible logits (``-inf`` for a row that sees no key), differentiable like ``out``.
      Only methods whose spec declares ``lse`` may have such backends.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    serves: Serves = always
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    differentiable: bool = True
    exact: bool = True
    tolerance: Tolerance | None = None
    priority: Mapping[str, int] = field(default_factory=dict, hash=False)
    lse: bool = False

    def priority_on(self, device_type: str) -> int:
        """This backend's priority on ``device_type`` (``"cpu"``, ``"cuda"``...): higher is tried first."""
        if device_type in self.priority:
            return self.priority[device_type]
        return (CPU_DEFAULT_PRIORITY if device_type == "cpu" else DEFAULT_PRIORITY).get(self.name, 0)

    def refusal(self, call: Call) -> str | None:
        """Why this backend cannot serve ``call`` (its declared devices, dtypes, training, then ``serves``), or None."""
        if self.devices is not None and call.device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {call.device.type}"
        if self.dtypes is not None and call.dtype not in self.dtypes:
            return f"serves dtypes {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}, not {call.dtype}"
        if call.requires_grad and not self.differentiable:
            return "has no backward (inputs require grad)"
        if call.return_lse and not self.lse:
            return "does not return the log-sum-exp"
        return self.serves(call)


@dataclass(frozen=True)
class Decoder:
    """A method's recurrent form: a causal forward that returns a state, and a step that continues from it.

    - ``prefill(q, k, v, *, scale, **params) -> (out, state)``: causal self-attention over a prompt;
    - ``step(state, q, k, v, *, scale, **params) -> (out, state)``: one token (seq 1; several if ``chunked``);
      ``state=None`` starts an empty sequence.

    Both are called, like a backend, with validated inputs, the resolved scale and every parameter. The state is the
    method's own (a tensor, a dataclass); ``attnzoo.prefill``/``attnzoo.step`` carry it in a
    :class:`~attnzoo.api.DecodeState`. ``token_params`` names the parameters that hold one entry per token along
    their last dim, ``(B, H, S)`` like gated-delta gates or ``(B, S)`` like group ids: the prefill takes the prompt's,
    each step its own tokens'.
    ``kv_cache``: the state is a :class:`~attnzoo.kv.cache.KVCache` (presses apply to it) and ``prefill`` takes
    ``lengths=`` (right-padded prompts); other decoders get ragged prompts one sequence at a time. ``chunked``: ``step``
    takes ``T >= 1`` tokens at once (else ``attnzoo.step`` runs it token by token).
    """

    prefill: Callable[..., tuple[torch.Tensor, Any]]
    step: Callable[..., tuple[torch.Tensor, Any]]
    token_params: tuple[str, ...] = ()
    kv_cache: bool = False
    chunked: bool = False

    @classmethod
    def advancing(
        cls, empty: Callable[..., Any], advance: Callable[..., tuple[torch.Tensor, Any]], **flags: Any,
    ) -> Decoder:
        """The decoder of a method whose prefill and step are one ``advance(state, q, k, v, scale, params) -> (out,
        state)``: a prompt advances ``empty(q, k, v, params)`` (the empty sequence's state), a step the given state
        (or the empty one for ``None``). ``flags``: the other fields (``chunked``, ``token_params``...)."""

        def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    **params: Any) -> tuple[torch.Tensor, Any]:
            return advance(empty(q, k, v, params), q, k, v, scale, params)

        def step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                 **params: Any) -> tuple[torch.Tensor, Any]:
            return advance(empty(q, k, v, params) if state is None else state, q, k, v, scale, params)

        prefill.__wrapped__ = step.__wrapped__ = advance  # type: ignore[attr-defined]  # `attnzoo info` shows it
        return cls(prefill, step, **flags)


@dataclass(frozen=True)
class TestHints:
    """What the conformance suite needs to know that the signature does not say.

    ``sample_params(call, generator)`` gives valid parameter values (e.g. learnable tensors) for a call's shapes.
    ``atol``/``rtol`` are fp32 tolerances against the fp64 reference. ``decoding_params(call, params, prompt)``
    gives what a decoded sequence must be told that a forward derives from its length (sigmoid's bias ``−log N``, the
    final layout of a strided neighbourhood), for a call over the whole sequence with the sampled ``params`` decoded
    from a prompt of ``prompt`` tokens; they replace the sampled values in the forward too.
    """

    sample_params: Callable[[Call, torch.Generator], dict[str, Any]] | None = None
    decoding_params: Callable[[Call, dict[str, Any], int], dict[str, Any]] | None = None
    atol: float = 2e-5
    rtol: float = 1e-4


@dataclass(frozen=True)
class MethodSpec:
    """Everything a user (and the test suite) can know about a method without reading its code."""

    name: str
    family: str
    mechanism: str
    paper: str
    arxiv: str | None
    summary: str
    exact: bool
    patterns: frozenset[str]
    params: tuple[Param, ...] = ()
    complexity: str = "O(N²d) time"
    supports_mask: bool = True
    supports_bias: bool = True
    differentiable: bool = True
    subquadratic_memory: bool = False
    tests: TestHints = TestHints()
    # D family: the parameters that make the method read about ``fraction`` of the keys a query may see (for a call
    # of these shapes), so that methods are compared at equal density (``attnzoo bench --suite dynamic``)
    at_density: Callable[[Call, float], dict[str, Any]] | None = None
    # local patterns: the parameters that make a query reach about ``fraction`` of the key sequence back (so that a
    # model's window follows its sequence: ``attnzoo bench --suite quality``)
    at_reach: Callable[[Call, float], dict[str, Any]] | None = None
    # the output is one softmax over each query's visible keys: the reference takes ``return_lse=True`` and returns
    # ``(out, lse)``, and ``attention(..., return_lse=True)`` serves it (from backends that declare ``lse``)
    lse: bool = False
    backends: tuple[str, ...] = ()  # filled in by register(): the fast paths in (GPU) priority order, then "reference"
    decoding: bool = False  # filled in by register(): whether it has a Decoder (attnzoo.prefill / attnzoo.step)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class Method:
    """A registered method: its spec, its dense reference, its fast paths (in GPU priority order), its decoder."""

    spec: MethodSpec
    reference: Callable[..., torch.Tensor]
    backends: tuple[Backend, ...]
    decoder: Decoder | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def backend(self, name: str) -> Backend:
        """The backend called ``name`` (``"reference"``: the dense reference, exact, on any device)."""
        if name == "reference":
            return Backend("reference", self.reference, differentiable=self.spec.differentiable, lse=self.spec.lse)
        for b in self.backends:
            if b.name == name:
                return b
        raise fail("backend", f"'auto' or one of {list(self.spec.backends)} for method {self.name!r}", repr(name))

    def by_priority(self, device_type: str) -> list[Backend]:
        """The fast paths in the order ``auto`` tries them on ``device_type`` (ties keep registration order)."""
        return sorted(self.backends, key=lambda b: -b.priority_on(device_type))


_REGISTRY: dict[str, Method] = {}


def register(
    spec: MethodSpec, reference: Callable[..., torch.Tensor], backends: list[Backend], decoder: Decoder | None = None,
) -> Method:
    """Register a method. Called once at the bottom of each method file.

    Fills in ``spec.backends`` and ``spec.decoding``. A bad spec (unknown family, an ID of another family's letter,
    unknown patterns, a bad backend) raises :class:`AttnzooError` naming the field.
    """
    where = f"method {spec.name!r}"
    if spec.name in _REGISTRY:
        raise fail("name", f"a name not registered yet ({where} is)", repr(spec.name))
    fam = family(spec.family)
    if not spec.mechanism.startswith(fam.letter):
        raise fail("mechanism", f"a {fam.name!r} catalogue ID ({fam.letter}<n>) for {where}", repr(spec.mechanism))
    bad = set(spec.patterns) - ALL_PATTERNS
    if bad or not spec.patterns:
        raise fail("patterns", f"a non-empty subset of {list(PATTERNS)} for {where}", sorted(spec.patterns))
    method = Method(spec=replace(spec, decoding=decoder is not None), reference=reference, backends=(),
                    decoder=decoder)
    for b in backends:
        method = _with_backend(method, b)
    _REGISTRY[spec.name] = method
    return method


def register_backend(method: str, backend: Backend) -> Method:
    """Add ``backend`` to the registered ``method``: one call, from any package (a Triton kernel of a method, say).

    ``attnzoo.attention(..., backend=backend.name)`` then runs it, ``backend="auto"`` tries it by its priority, and
    the conformance suite (``attnzoo verify``, ``tests/conformance``) checks it against the reference, within its
    declared tolerance if it is approximate. Returns the updated :class:`Method`.
    """
    updated = _with_backend(get(method), backend)
    _REGISTRY[updated.name] = updated
    return updated


def _with_backend(m: Method, b: Backend) -> Method:
    """``m`` with ``b`` added, after checking ``b``'s declarations."""
    where = f"method {m.name!r}"
    if not isinstance(b, Backend):
        raise fail("backend", f"an attnzoo.registry.Backend for {where}", type(b).__name__)
    if not isinstance(b.name, str) or not b.name.isidentifier() or b.name in ("auto", "reference"):
        raise fail("backend", f"a name that is an identifier, not 'auto' or 'reference', for {where}", repr(b.name))
    if any(other.name == b.name for other in m.backends):
        raise fail("backend", f"a name {where} does not have yet ({list(m.spec.backends)})", repr(b.name))
    if not b.exact and b.tolerance is None:
        raise fail("tolerance", f"a Tolerance(atol, rtol) for approximate backend {b.name!r} of {where}", None)
    if b.lse and not m.spec.lse:
        raise fail("lse", f"False for backend {b.name!r}: {where}'s spec does not declare a log-sum-exp", b.lse)
    if b.tolerance is not None and not isinstance(b.tolerance, Tolerance):
        raise fail("tolerance", f"a Tolerance(atol, rtol) for backend {b.name!r} of {where}", repr(b.tolerance))
    backends = (*m.backends, b)
    order = tuple(sorted(backends, key=lambda x: -x.priority_on("cuda")))
    spec = replace(m.spec, backends=(*(x.name for x in order), "reference"))
    return replace(m, spec=spec, backends=order)


def get(name: str) -> Method:
    """The registered method called ``name``; an unknown name raises with the closest registered names."""
    if not isinstance(name, str):
        raise fail("method", "a method name (str)", repr(name))
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see attnzoo.methods()"
        raise AttnzooError(f"method: unknown method {name!r}{hint}") from None


def methods() -> dict[str, MethodSpec]:
    """Every registered method's spec, by name, in catalogue order."""
    return {m.name: m.spec for m in all_methods()}


def _catalogue_key(m: Method) -> tuple[int, int, str]:
    """Catalogue order: by family, then number (S1, S2, …, P1, …)."""
    number = m.spec.mechanism[1:]
    order = [f.name for f in FAMILIES].index(m.spec.family)
    return order, int(number) if number.isdigit() else 0, m.name


def all_methods() -> list[Method]:
    """Every registered method, in catalogue order."""
    return sorted(_REGISTRY.values(), key=_catalogue_key)


def decoding_methods() -> list[str]:
    """The registered methods whose spec declares decoding, in catalogue order."""
    return [m.name for m in all_methods() if m.spec.decoding]
