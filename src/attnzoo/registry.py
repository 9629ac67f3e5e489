"""The method registry: every mechanism registers a :class:`MethodSpec`, its reference and its fast paths.

A method file ends with one ``register(...)`` call. The API, the CLI, the benchmark and the conformance suite all
walk this registry, so a new method is tested, listed and benchmarked without new code elsewhere.
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
BACKEND_ORDER: tuple[str, ...] = ("triton", "sdpa", "flex", "torch", "reference")
# On CPU, ``auto`` tries ``torch`` before ``flex``: CPU FlexAttention compiles for seconds per new shape and, measured
# here, beats the blockwise torch paths only narrowly where it wins at all (and loses 4x on 2-D neighborhoods).
CPU_BACKEND_ORDER: tuple[str, ...] = ("triton", "sdpa", "torch", "flex", "reference")


def pattern_of(cross: bool, causal: bool) -> str:
    """The CAB pattern name for a call: ``self``/``cross`` × ``causal``/``noncausal``."""
    return f"{'cross' if cross else 'self'}/{'causal' if causal else 'noncausal'}"


@dataclass(frozen=True)
class Call:
    """What a backend or a parameter check may know about a call, before any compute."""

    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    causal: bool
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    has_mask: bool
    has_bias: bool
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cross(self) -> bool:
        return self.seq_q != self.seq_kv

    @property
    def pattern(self) -> str:
        return pattern_of(self.cross, self.causal)


@dataclass(frozen=True)
class LayerInfo:
    """What an ``nn`` layer tells a learnable parameter's initialiser."""

    heads: int
    kv_heads: int
    head_dim: int
    params: Mapping[str, Any]


Check = Callable[[Any, Call], "str | None"]


@dataclass(frozen=True)
class Param:
    """A typed method parameter with its default and validation.

    ``types`` lists accepted Python types (``torch.Tensor`` among them for tensor-valued parameters). ``low``/``high``
    bound numbers (``low_open`` makes the lower bound strict). ``choices`` restricts to a set. ``check`` validates
    against the call (shapes of tensor parameters, say) and returns a message saying what was expected, or None.
    ``init`` marks a learnable parameter: the ``nn`` layer creates it as an ``nn.Parameter`` from ``init(layer)``.
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

    def validate(self, value: Any, call: Call | None = None) -> Any:
        """Return ``value`` if valid for this parameter, else raise :class:`AttnzooError` naming it."""
        if value is None:
            if self.default is None:
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
        return " or ".join(names) + (" or None" if self.default is None else "")

    def invalid_examples(self) -> list[Any]:
        """Values this parameter must reject (used by the conformance suite)."""
        bad: list[Any] = ["not-a-value"] if str not in self.types else []
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
class Backend:
    """One implementation of a method. ``serves(call)`` returns why it cannot serve a call, or None if it can."""

    name: str
    fn: Callable[..., torch.Tensor]
    serves: Serves = always


@dataclass(frozen=True)
class TestHints:
    """What the conformance suite needs to know that the signature does not say.

    ``sample_params(call, generator)`` gives valid parameter values (e.g. learnable tensors) for a call's shapes.
    ``atol``/``rtol`` are fp32 tolerances against the fp64 reference.
    """

    sample_params: Callable[[Call, torch.Generator], dict[str, Any]] | None = None
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
    backends: tuple[str, ...] = ()  # filled in by register(): the fast paths in priority order, then "reference"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class Method:
    """A registered method: its spec, its dense reference and its fast paths (in priority order)."""

    spec: MethodSpec
    reference: Callable[..., torch.Tensor]
    backends: tuple[Backend, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def backend(self, name: str) -> Backend:
        if name == "reference":
            return Backend("reference", self.reference)
        for b in self.backends:
            if b.name == name:
                return b
        raise fail("backend", f"one of {list(self.spec.backends)} for method {self.name!r}", repr(name))


_REGISTRY: dict[str, Method] = {}


def register(spec: MethodSpec, reference: Callable[..., torch.Tensor], backends: list[Backend]) -> Method:
    """Register a method. Called once at the bottom of each method file."""
    if spec.name in _REGISTRY:
        raise RuntimeError(f"method {spec.name!r} registered twice")
    bad = set(spec.patterns) - ALL_PATTERNS
    if bad or not spec.patterns:
        raise RuntimeError(f"method {spec.name!r}: patterns must be a non-empty subset of {PATTERNS}, got {bad}")
    names = [b.name for b in backends]
    if "reference" in names or len(set(names)) != len(names):
        raise RuntimeError(f"method {spec.name!r}: backend names must be unique and not 'reference'")
    ordered = tuple(sorted(backends, key=lambda b: BACKEND_ORDER.index(b.name)))
    spec = replace(spec, backends=(*(b.name for b in ordered), "reference"))
    method = Method(spec=spec, reference=reference, backends=ordered)
    _REGISTRY[spec.name] = method
    return method


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


FAMILY_ORDER = "SPDLHQKC"


def _catalogue_key(m: Method) -> tuple[int, int, str]:
    """Order methods as MECHANISMS.md does: by family letter, then number (S1, S2, …, P1, …)."""
    letter, number = m.spec.mechanism[:1], m.spec.mechanism[1:]
    family = FAMILY_ORDER.index(letter) if letter in FAMILY_ORDER else len(FAMILY_ORDER)
    return family, int(number) if number.isdigit() else 0, m.name


def all_methods() -> list[Method]:
    """Every registered method, in catalogue order."""
    return sorted(_REGISTRY.values(), key=_catalogue_key)
