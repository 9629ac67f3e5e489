"""The conformance checks, generated from the registry.

For every registered method, every pattern it supports and every backend registered for it (those of packages outside
attnzoo included, see :func:`attnzoo.registry.register_backend`), a :class:`Case` runs these checks against the
method's dense ``reference``:

- ``fp64``: output on random shapes (batch > 1, GQA, odd sizes, cross lengths) equals the fp64 reference;
- ``fp32``: fp32 output against the fp64 reference within the method's tolerance;
- ``grad``: gradients of q, k, v and every tensor parameter equal the reference's (fp64), for differentiable methods
  on backends that serve training calls;
- ``noncontiguous``: inputs that are strided views give the same output;
- ``masked-rows``: with a user mask hiding every key from some rows, those rows are exactly 0 and gradients are
  finite (methods taking ``mask``);
- ``low-precision``: bf16 (and fp16 on GPU) inputs with logits in the thousands give finite outputs (no overflow);
- ``lse`` (methods whose spec declares ``lse``): ``return_lse=True`` gives the reference's output and log-sum-exp
  (``-inf`` exactly on the rows that see no key), and gradients through both equal the reference's (fp64);
- ``split-merge`` (those of them taking a ``mask``): attention over the first half of the keys and over the rest
  (split by the user mask, so the method's own pattern is unchanged), merged by :func:`attnzoo.merge`, equals
  attention over all of them, output, log-sum-exp and gradients, for the backend and for the reference.

An exact backend is held to fp64 round-off (fp32: the method's ``tests`` tolerance); an approximate one to the
:class:`~attnzoo.registry.Tolerance` it declares (fp32: the looser of the two). A check whose call the backend refuses
(device, dtype, training, its own ``serves``) is a skip with its reason.

:func:`decoding_check` checks, for every method whose spec declares ``decoding``, that ``attnzoo.prefill`` on a prompt
then ``attnzoo.step`` one token at a time and then a chunk of tokens give the one causal forward's output (fp64), for
a full batch and for a ragged one (``lengths=``: each sequence continues from its own length), and that a KV-cache
state reports its ``nbytes``.

:func:`bad_input_checks` checks, per method, that unsupported patterns and out-of-range parameters raise
:class:`~attnzoo.errors.AttnzooError` naming the argument. ``tests/conformance`` turns these into pytest cases and
``attnzoo verify`` runs them for a user on their own machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from attnzoo.api import attention, prefill, prepare, step
from attnzoo.errors import AttnzooError
from attnzoo.kernels.merge import merge_parts
from attnzoo.registry import PATTERNS, Call, Method, Shape, Tolerance, all_methods, get

# Self-attention shapes (seq_q == seq_kv) and cross-attention shapes (seq_q != seq_kv, both longer and shorter).
SELF_SHAPES = (Shape(2, 4, 2, 33, 33, 16, 16), Shape(1, 2, 2, 1, 1, 8, 8), Shape(2, 3, 1, 129, 129, 8, 12))
CROSS_SHAPES = (Shape(2, 4, 2, 7, 33, 16, 16), Shape(1, 2, 1, 33, 7, 8, 12), Shape(2, 2, 2, 1, 129, 8, 8))
# FlexAttention compiles per shape (seconds each on CPU): its cases use the first shape only.
COMPILED_BACKENDS = frozenset({"flex"})


@dataclass(frozen=True)
class Case:
    method: str
    backend: str
    pattern: str

    def __str__(self) -> str:
        return f"{self.method}-{self.backend}-{self.pattern.replace('/', '-')}"


@dataclass(frozen=True)
class Result:
    case: str
    check: str
    status: str  # "pass", "fail" or "skip"
    detail: str = ""


def cases(names: list[str] | None = None) -> list[Case]:
    """Every (method, backend, pattern) to check, for ``names`` (default: every registered method)."""
    chosen = [get(n) for n in names] if names else all_methods()
    return [
        Case(m.name, b.name, p)
        for m in chosen
        for b in m.backends
        for p in PATTERNS
        if p in m.spec.patterns
    ]


def shapes_for(case: Case) -> tuple[Shape, ...]:
    pool = CROSS_SHAPES if case.pattern.startswith("cross") else SELF_SHAPES
    return pool[:1] if case.backend in COMPILED_BACKENDS else pool


def _call(shape: Shape, causal: bool, device: torch.device, dtype: torch.dtype) -> Call:
    return Call(**asdict(shape), causal=causal, device=device, dtype=dtype, requires_grad=False, has_mask=False,
                has_bias=False)


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: dict[str, Any]

    def to(self, dtype: torch.dtype, grad: bool = False) -> Inputs:
        def conv(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(dtype).requires_grad_(grad)
            return t

        return Inputs(conv(self.q), conv(self.k), conv(self.v), {n: conv(t) for n, t in self.params.items()})

    def grad_tensors(self) -> dict[str, torch.Tensor]:
        named = {"q": self.q, "k": self.k, "v": self.v, **self.params}
        return {n: t for n, t in named.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def make_inputs(m: Method, shape: Shape, causal: bool, device: torch.device, seed: int = 0) -> Inputs:
    """Random fp64 inputs for ``shape`` and valid parameters from the method's ``sample_params``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device)

    q = randn(shape.batch, shape.heads, shape.seq_q, shape.head_dim)
    k = randn(shape.batch, shape.kv_heads, shape.seq_kv, shape.head_dim)
    v = randn(shape.batch, shape.kv_heads, shape.seq_kv, shape.head_dim_v)
    sample = m.spec.tests.sample_params
    params = sample(_call(shape, causal, device, torch.float64), g) if sample else {}
    params = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in params.items()}
    return Inputs(q, k, v, params)


def _run(m: Method, backend: str, x: Inputs, causal: bool, **kw: Any) -> torch.Tensor:
    return attention(x.q, x.k, x.v, method=m.name, causal=causal, backend=backend, **kw, **x.params)


def _serves(m: Method, backend: str, x: Inputs, causal: bool, **kw: Any) -> str | None:
    try:
        call = prepare(m, x.q, x.k, x.v, causal, None, kw.get("mask"), None, x.params)[0]
    except AttnzooError as e:
        return f"rejected: {e}"
    return m.backend(backend).refusal(replace(call, return_lse=kw.get("return_lse", False)))


def _close(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return "non-finite values"
    err = (got.double() - want.double()).abs()
    bound = tol.atol + tol.rtol * want.double().abs()
    if bool((err > bound).any()):
        return f"max abs error {err.max().item():.3g} (atol {tol.atol:g}, rtol {tol.rtol:g})"
    return None


def run_case(case: Case, device: torch.device | str = "cpu") -> list[Result]:
    """Run every check of ``case``; a check the backend cannot serve is a skip with its reason."""
    device = torch.device(device)
    m = get(case.method)
    causal = case.pattern.endswith("/causal")
    results: list[Result] = []
    checks: list[tuple[str, Callable[[Method, str, Inputs, bool, torch.device], str | None]]] = [
        ("fp64", _check_fp64),
        ("fp32", _check_fp32),
        ("grad", _check_grad),
        ("noncontiguous", _check_noncontiguous),
        ("masked-rows", _check_masked_rows),
        ("low-precision", _check_low_precision),
        ("lse", _check_lse),
        ("split-merge", _check_split_merge),
    ]
    for name, check in checks:
        if case.backend in COMPILED_BACKENDS and name in ("fp64", "noncontiguous", "low-precision"):
            continue  # each would compile FlexAttention again (seconds) for a new dtype/layout; fp32 covers the path
        for shape in shapes_for(case):
            x = make_inputs(m, shape, causal, device)
            try:
                problem = check(m, case.backend, x, causal, device)
            except _SkipCheck as s:
                results.append(Result(str(case), name, "skip", str(s)))
                break
            except Exception as e:  # a crash is a failure of the check, reported with its type
                problem = f"raised {type(e).__name__}: {e}"
            if problem is not None:
                results.append(Result(str(case), name, "fail", f"{shape}: {problem}"))
                break
        else:
            results.append(Result(str(case), name, "pass"))
    return results


class _SkipCheck(Exception):  # noqa: N818  (a control-flow signal, not an error)
    pass


def _require(m: Method, backend: str, x: Inputs, causal: bool, **kw: Any) -> None:
    reason = _serves(m, backend, x, causal, **kw)
    if reason is not None:
        raise _SkipCheck(reason)


FP64 = Tolerance(atol=1e-9, rtol=1e-7)
FP64_GRAD = Tolerance(atol=1e-8, rtol=1e-6)


def tolerance(m: Method, backend: str, exact: Tolerance) -> Tolerance:
    """What ``backend`` is held to where an exact backend is held to ``exact``: its declared tolerance if approximate
    (never tighter than ``exact``)."""
    declared = m.backend(backend).tolerance
    if m.backend(backend).exact or declared is None:
        return exact
    return Tolerance(max(declared.atol, exact.atol), max(declared.rtol, exact.rtol))


def _check_fp64(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    _require(m, backend, x, causal)
    with torch.no_grad():
        got = _run(m, backend, x, causal)
        want = _run(m, "reference", x, causal)
    return _close(got, want, tolerance(m, backend, FP64))


def _check_fp32(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    x32 = x.to(torch.float32)
    _require(m, backend, x32, causal)
    with torch.no_grad():
        got = _run(m, backend, x32, causal)
        want = _run(m, "reference", x, causal)
    return _close(got, want, tolerance(m, backend, Tolerance(m.spec.tests.atol, m.spec.tests.rtol)))


def _grads(m: Method, backend: str, x: Inputs, causal: bool, cotangent: torch.Tensor, **kw: Any) -> dict[str, Any]:
    out = _run(m, backend, x, causal, **kw)
    tensors = x.grad_tensors()
    grads = torch.autograd.grad((out * cotangent).sum(), list(tensors.values()), allow_unused=True)
    return {"out": out, **dict(zip(tensors, grads))}


def _check_grad(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    if not m.spec.differentiable:
        raise _SkipCheck("method is inference-only")
    xg = x.to(torch.float64, grad=True)
    _require(m, backend, xg, causal)
    g = torch.Generator(device="cpu").manual_seed(1)
    cot = torch.randn(x.q.shape[:-1] + (x.v.shape[-1],), generator=g, dtype=torch.float64).to(device)
    got = _grads(m, backend, xg, causal, cot)
    want = _grads(m, "reference", x.to(torch.float64, grad=True), causal, cot)
    for name, w in want.items():
        if w is None:
            continue
        if got[name] is None:
            return f"no gradient for {name}"
        problem = _close(got[name], w, tolerance(m, backend, FP64_GRAD))
        if problem is not None:
            return f"{'output' if name == 'out' else 'd' + name}: {problem}"
    return None


def _check_noncontiguous(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    _require(m, backend, x, causal)

    def strided(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) memory, as projections produce

    xs = Inputs(strided(x.q), strided(x.k), strided(x.v), x.params)
    with torch.no_grad():
        got = _run(m, backend, xs, causal)
        want = _run(m, "reference", x, causal)
    return _close(got, want, tolerance(m, backend, FP64))


def _check_masked_rows(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    if not m.spec.supports_mask:
        raise _SkipCheck("method takes no mask")
    b, _, sq, _ = x.q.shape
    g = torch.Generator(device="cpu").manual_seed(2)
    mask = (torch.rand(b, 1, sq, x.k.shape[2], generator=g) < 0.7).to(device)
    mask[:, :, 0, :] = False  # row 0 sees nothing
    xg = x.to(torch.float64, grad=m.spec.differentiable)
    if _serves(m, backend, xg, causal, mask=mask) is not None:
        xg = x  # the backend is forward-only here: check the output alone
        _require(m, backend, xg, causal, mask=mask)
    if xg.grad_tensors():
        cot = torch.ones(x.q.shape[:-1] + (x.v.shape[-1],), dtype=torch.float64, device=device)
        got = _grads(m, backend, xg, causal, cot, mask=mask)
    else:
        with torch.no_grad():
            got = {"out": _run(m, backend, xg, causal, mask=mask)}
    with torch.no_grad():
        want = _run(m, "reference", x, causal, mask=mask)
    if not bool((got["out"][:, :, 0] == 0).all()):
        return "a row with no visible key is not all zeros"
    for name, t in got.items():
        if t is not None and not torch.isfinite(t).all():
            return f"non-finite {'output' if name == 'out' else 'd' + name}"
    return _close(got["out"], want, tolerance(m, backend, FP64))


def _check_low_precision(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    dtypes = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        big = Inputs(x.q * 30.0, x.k * 30.0, x.v, x.params)
        xl = big.to(dtype)
        _require(m, backend, xl, causal)
        with torch.no_grad():
            got = _run(m, backend, xl, causal)
            want = _run(m, "reference", big, causal)
        if got.shape != want.shape:
            return f"{dtype}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
        if not torch.isfinite(got).all():
            return f"{dtype}: non-finite output"
    return None


def _lse_inputs(m: Method, backend: str, x: Inputs, causal: bool, **kw: Any) -> Inputs:
    """``x`` in fp64 requiring grad if the method and backend train with ``return_lse`` (else plain fp64); skips a
    method without a log-sum-exp and a backend that cannot serve the call."""
    if not m.spec.lse:
        raise _SkipCheck("the method returns no log-sum-exp")
    xg = x.to(torch.float64, grad=m.spec.differentiable)
    if _serves(m, backend, xg, causal, return_lse=True, **kw) is not None:
        xg = x  # forward-only here: check the values alone
        _require(m, backend, xg, causal, return_lse=True, **kw)
    return xg


def _with_lse(m: Method, backend: str, x: Inputs, causal: bool, cot: tuple[torch.Tensor, torch.Tensor],
              parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """``(out, lse)`` of ``backend`` (the merge of one call per keyword set in ``parts``) and, if ``x`` requires grad,
    the gradients of ``⟨cot_out, out⟩ + ⟨cot_lse, lse⟩`` (``-inf`` entries of lse excluded)."""
    results = [attention(x.q, x.k, x.v, method=m.name, causal=causal, backend=backend, return_lse=True, **kw,
                         **x.params) for kw in parts]
    out, lse = results[0] if len(results) == 1 else merge_parts(results)
    named = {"out": out, "lse": lse}
    tensors = x.grad_tensors()
    if tensors:
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (out * cot[0]).sum() + (finite * cot[1]).sum()
        grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
        named.update(zip((f"d{n}" for n in tensors), grads, strict=True))  # "d" + name: a parameter may be "lse"
    return named


def _compare_lse(got: dict[str, Any], want: dict[str, Any], tol: Tolerance, grad_tol: Tolerance) -> str | None:
    """Compare the outputs of :func:`_with_lse`: the same ``-inf`` rows, then values and gradients."""
    if got["lse"].shape != want["lse"].shape:
        return f"lse shape {tuple(got['lse'].shape)} != {tuple(want['lse'].shape)}"
    hidden = torch.isneginf(want["lse"])
    if not torch.equal(torch.isneginf(got["lse"]), hidden):
        return "lse is not -inf exactly on the rows that see no key"
    for name, w in want.items():
        g = got.get(name)
        if w is None:
            continue
        if g is None:
            return f"no gradient for {name}"
        if name == "lse":
            g, w = g.masked_fill(hidden, 0.0), w.masked_fill(hidden, 0.0)
        problem = _close(g, w, tol if name in ("out", "lse") else grad_tol)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _lse_cotangents(x: Inputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(3)
    out = torch.randn(x.q.shape[:-1] + (x.v.shape[-1],), generator=g, dtype=torch.float64).to(device)
    return out, torch.randn(x.q.shape[:-1], generator=g, dtype=torch.float64).to(device)


def _check_lse(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    xg = _lse_inputs(m, backend, x, causal)
    cot = _lse_cotangents(x, device)
    got = _with_lse(m, backend, xg, causal, cot, ({},))
    want = _with_lse(m, "reference", x.to(torch.float64, grad=bool(xg.grad_tensors())), causal, cot, ({},))
    return _compare_lse(got, want, tolerance(m, backend, FP64), tolerance(m, backend, FP64_GRAD))


def _check_split_merge(m: Method, backend: str, x: Inputs, causal: bool, device: torch.device) -> str | None:
    if not m.spec.supports_mask:
        raise _SkipCheck("method takes no mask: its keys cannot be split without changing its own pattern")
    skv = x.k.shape[2]
    first = (torch.arange(skv, device=device) < (skv + 1) // 2).view(1, 1, 1, skv)
    xg = _lse_inputs(m, backend, x, causal, mask=first)
    cot = _lse_cotangents(x, device)
    for name in (backend, "reference"):
        whole = _with_lse(m, name, xg, causal, cot, ({},))
        merged = _with_lse(m, name, xg, causal, cot, ({"mask": first}, {"mask": ~first}))
        problem = _compare_lse(merged, whole, FP64, FP64_GRAD)
        if problem is not None:
            return f"{name}: merged halves != whole: {problem}"
    return None


# Decoding: a prompt, then single tokens, then a chunk of several tokens (GQA, odd lengths); the ragged run gives the
# second sequence a prompt RAGGED_SHORTER tokens shorter (right padding), so it ends that much earlier.
DECODE_SHAPE = Shape(2, 4, 2, 29, 29, 8, 6)
DECODE_PROMPT, DECODE_SINGLE_STEPS, RAGGED_SHORTER = 13, 5, 4


def decoding_check(name: str, device: torch.device | str = "cpu") -> Result:
    """``prefill`` on a prompt, ``step`` token by token, then ``step`` on a chunk equal one causal forward (fp64); the
    same with a ragged batch (``prefill(..., lengths=)``): each sequence's outputs equal the causal forward over its
    own tokens, padded prompt outputs are 0; a KV-cache state reports its ``nbytes``."""
    device = torch.device(device)
    m = get(name)
    label = f"{name}-decoding"
    if m.decoder is None:
        return Result(label, "decoding", "skip", "the method does not declare decoding")
    x = _decoding_inputs(m, device)
    n, cut = DECODE_SHAPE.seq_q, DECODE_PROMPT
    try:
        with torch.no_grad():
            want = _run(m, "reference", x, True)
            for ragged in (False, True):
                lengths = torch.tensor([cut, cut - RAGGED_SHORTER if ragged else cut], device=device)
                try:
                    got, state = _decode(m, x, lengths, ragged)
                except AttnzooError as e:  # a decoder may refuse ragged prompts, naming lengths
                    if ragged and "lengths" in str(e):
                        return Result(label, "decoding", "pass", f"ragged prompts refused: {e}")
                    raise
                if state.length != n:
                    return Result(label, "decoding", "fail", f"state.length {state.length} after {n} tokens")
                problem = _nbytes_problem(m, state.data)
                for b, length in enumerate(lengths.tolist()):
                    seen = length + n - cut
                    problem = problem or _close(got[b, :, :seen], want[b, :, :seen], FP64)
                    if problem is None and ragged and bool(got[b, :, seen:].any()):
                        problem = "outputs of padding positions are not 0"
                if problem:
                    return Result(label, "decoding", "fail", f"{'ragged: ' if ragged else ''}{problem}")
    except Exception as e:  # a crash is a failure of the check, reported with its type
        return Result(label, "decoding", "fail", f"raised {type(e).__name__}: {e}")
    return Result(label, "decoding", "pass")


def _decoding_inputs(m: Method, device: torch.device) -> Inputs:
    """The decoding check's inputs: sampled ones, with what decoding must be told (``TestHints.decoding_params``)."""
    x = make_inputs(m, DECODE_SHAPE, True, device)
    extra = m.spec.tests.decoding_params
    if extra is None:
        return x
    call = _call(DECODE_SHAPE, True, device, torch.float64)
    told = extra(call, x.params, DECODE_PROMPT - RAGGED_SHORTER)
    return Inputs(x.q, x.k, x.v, {**x.params, **{n: t.to(device) if isinstance(t, torch.Tensor) else t
                                                for n, t in told.items()}})


def _decode(m: Method, x: Inputs, lengths: torch.Tensor, ragged: bool) -> tuple[torch.Tensor, Any]:
    """Decode ``x``: a prompt of ``lengths[b]`` tokens per sequence (one ``prefill``), then single steps, then one
    chunk, sequence ``b`` continuing from its own token ``lengths[b]``. Returns the outputs ``(B, H, n, Dv)``, each
    sequence's at its own positions (0 past its end), and the final state."""
    token_params = m.decoder.token_params  # type: ignore[union-attr]
    batch, n, cut = x.q.shape[0], x.q.shape[2], DECODE_PROMPT
    per_token = {name: t.expand(batch, *t.shape) if t.dim() == 1 else t
                 for name, t in x.params.items() if name in token_params and torch.is_tensor(t)}

    def tokens(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[lengths[b] + start, lengths[b] + stop)`` of each sequence (last dim for parameters, else 2)."""
        index = lengths.view(-1, 1) + torch.arange(start, stop, device=t.device)
        if t.dim() == 4:
            return t.gather(2, index.view(batch, 1, -1, 1).expand(-1, t.shape[1], -1, t.shape[3]))
        return t.gather(-1, index.view(batch, *(1,) * (t.dim() - 2), -1).expand(*t.shape[:-1], -1))

    prompt = {name: t[..., :cut] for name, t in per_token.items()}
    out, state = prefill(x.q[:, :, :cut], x.k[:, :, :cut], x.v[:, :, :cut], method=m.name,
                         lengths=lengths if ragged else None, **{**x.params, **prompt})
    outs = [out]
    for start, stop in [(t, t + 1) for t in range(DECODE_SINGLE_STEPS)] + [(DECODE_SINGLE_STEPS, n - cut)]:
        part = {name: tokens(t, start, stop) for name, t in per_token.items()}
        out, state = step(state, *(tokens(t, start, stop) for t in (x.q, x.k, x.v)), **part)
        outs.append(out)
    got = torch.zeros_like(torch.cat(outs, dim=2))
    got[:, :, :cut] = outs[0]
    decoded = torch.cat(outs[1:], dim=2)
    for b, length in enumerate(lengths.tolist()):
        got[b, :, length : length + n - cut] = decoded[b]
    return got, state


def _nbytes_problem(m: Method, data: Any) -> str | None:
    """A KV-cache decoder's state must report the bytes it holds."""
    if not m.decoder.kv_cache:  # type: ignore[union-attr]
        return None
    held = getattr(data, "nbytes", None)
    keys = data.keys.numel() * data.keys.element_size()
    if not isinstance(held, int) or held < keys:
        return f"state.data.nbytes is {held!r}, not the bytes held (at least the keys' {keys})"
    return None


def bad_input_checks(name: str, device: torch.device | str = "cpu") -> Iterator[Result]:
    """Unsupported patterns and invalid parameter values must raise an AttnzooError naming the argument."""
    device = torch.device(device)
    m = get(name)
    for pattern in PATTERNS:
        if pattern in m.spec.patterns:
            continue
        causal = pattern.endswith("/causal")
        shape = CROSS_SHAPES[0] if pattern.startswith("cross") else SELF_SHAPES[0]
        x = make_inputs(m, shape, causal, device)
        yield _expect_error(f"{name}-bad-pattern-{pattern}", lambda x=x, c=causal: _run(m, "reference", x, c),
                            "causal" if causal else "k")
    supported = sorted(m.spec.patterns)[0]
    causal = supported.endswith("/causal")
    x = make_inputs(m, CROSS_SHAPES[0] if supported.startswith("cross") else SELF_SHAPES[0], causal, device)
    for p in m.spec.params:
        for value in p.invalid_examples():
            bad = Inputs(x.q, x.k, x.v, {**x.params, p.name: value})
            yield _expect_error(f"{name}-bad-{p.name}={value!r}", lambda b=bad: _run(m, "reference", b, causal),
                                p.name)
    yield _expect_error(f"{name}-unknown-param", lambda: _run(m, "reference", x, causal, no_such_param=1),
                        "no_such_param")
    if not m.spec.lse:
        yield _expect_error(f"{name}-return-lse", lambda: _run(m, "reference", x, causal, return_lse=True),
                            "return_lse")


def _expect_error(label: str, fn: Callable[[], Any], argument: str) -> Result:
    try:
        fn()
    except AttnzooError as e:
        if argument in str(e):
            return Result(label, "bad-input", "pass")
        return Result(label, "bad-input", "fail", f"error does not name {argument!r}: {e}")
    except Exception as e:
        return Result(label, "bad-input", "fail", f"raised {type(e).__name__} instead of AttnzooError: {e}")
    return Result(label, "bad-input", "fail", "no error raised")
