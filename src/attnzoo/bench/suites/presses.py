"""Suite ``presses`` (issue 10, "Quality"): what each KV-cache press keeps, measured at cache budgets of 100 %, 50 %,
25 %, 10 % and 3 %.

``attnzoo bench --suite presses`` walks the press registry (:func:`attnzoo.kv.presses.presses`; each press is built
with ``info.cls.for_budget(fraction)``, the fraction of tokens kept, or of bytes for presses that shrink each token)
and measures two things:

1. **Retrieval accuracy** of a small causal model trained in the benchmark (:mod:`attnzoo.bench.retrieval`:
   key-value pairs among fillers in a 512-token context, then query keys; the answer is the key's value). The context
   is prefilled layer by layer through ``attnzoo.prefill(..., press=P, layer=i)`` and the queries decoded with
   ``attnzoo.step``, so a query reads only what the press kept. The full cache is the ceiling. The trained weights
   are cached under the output directory (``press-model/``): a rerun skips training.
2. **Output error of one attention layer** against the full cache, on planted-structure inputs
   (:func:`planted_inputs`): random q/k/v plus a few *needles* far back that the last prompt queries and the decoded
   queries attend to, *heavy hitters* every query attends to (the first token among them, a sink), and a *recent
   band* (a smooth positional component shared by queries and keys, so each query leans towards the keys just before
   it). The prompt is prefilled with the press, ``decode`` more tokens are stepped, and the figure is the relative L2
   error ``‖O_press − O_full‖ / ‖O_full‖`` of the stepped outputs.

What a press ``needs`` is supplied through ``for_budget``'s options (:func:`build`): ``"queries"`` and ``"layer"``
come with every call; a wrapper (``"press"``) gets ``press=`` SnapKV (or the first plain scoring press registered)
at the same budget, and is listed as ``AdaKVPress(SnapKVPress)``; a press that needs ``"training"`` or
``"calibration"`` gets ``calibration=[(q, k, v) per layer]`` (the model's attention inputs on task sequences drawn
with another seed; for the layer error, another draw of the planted inputs) when its ``for_budget`` takes that
keyword. A press that needs anything else (video ``"frames"``...), whose ``for_budget`` cannot take calibration, or
that defines no ``for_budget`` is listed as skipped with the reason; one that fails while being built or run is
recorded with its error, and the suite goes on.

Rows go to ``results.json`` under ``presses`` (since schema ``attnzoo.bench/1.2``) and to the report: the leaderboard
(each press's accuracy and rank at every budget), the layer-error table, the runs without a result, and
``presses.png`` (accuracy and layer error against budget). ``presses.md`` holds the two tables for docs/benchmarks.md.

Sizes (:data:`FULL`) are chosen to fit well within 10 minutes on a 2-core CPU (19 presses: 146 s, training included;
docs/benchmarks.md): training 24–65 s (800 steps on 64-token contexts; no positional embedding, so it runs unchanged
at 512), 128 evaluation sequences of 8 queries (1024 answers, so an accuracy is ±3 % at worst, 95 %), one layer of 4
heads at N = 1024 for the layer error.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import attnzoo.api as az
from attnzoo.bench.efficiency import classify
from attnzoo.bench.retrieval import (
    RetrievalLM,
    RetrievalTask,
    Training,
    evaluate,
    layer_inputs,
    retrieval_batch,
    trained_model,
)
from attnzoo.errors import fail
from attnzoo.kv.presses.base import Press, PressInfo, ScorerPress

BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.03)
FULL_CACHE = "full cache"
PROVIDED = ("queries", "layer", "press", "calibration", "training")  # what a press may need that the suite supplies
Calibration = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Planted:
    """The layer-error inputs: ``batch × heads × (context + decode) × head_dim``; ``needles`` keys planted in the first
    quarter, ``hitters`` heavy-hitter keys (token 0 first), a recent band of about ``band`` positions; ``window`` last
    prompt queries attend to the needles as the decoded ones do (a question at the end of the prompt)."""

    batch: int = 2
    heads: int = 4
    context: int = 1024
    decode: int = 16
    head_dim: int = 64
    needles: int = 4
    hitters: int = 4
    band: int = 32
    window: int = 32


@dataclass(frozen=True)
class PressSuite:
    """Everything the suite runs: the task, the model's training, the evaluation set, the budgets, the planted
    inputs and the seed."""

    task: RetrievalTask = field(default_factory=RetrievalTask)
    training: Training = field(default_factory=Training)
    sequences: int = 128
    chunk: int = 64
    calibration_sequences: int = 16
    budgets: tuple[float, ...] = BUDGETS
    planted: Planted = field(default_factory=Planted)
    seed: int = 0


FULL = PressSuite()


def planted_inputs(p: Planted, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``q, k, v`` of the prompt and ``q, k, v`` of the decoded tokens (see the module docstring), all
    ``(batch, heads, ·, head_dim)``. On top of ``randn`` (logits ``q·k/√D``):

    - recent band: a smooth positional code ``c(t)`` (``D/4`` frequencies up to ``π/band``, norm 6) added to the first
      half of every query and key, so ``q_t·k_s`` gains ``36·mean cos(ω(t − s))``, largest for ``s`` near ``t``;
    - heavy hitters: token 0 and ``hitters − 1`` random tokens get ``8·u`` on their keys, every query ``3·u`` (``u`` a
      random unit direction per head): a logit boost of 3;
    - needles: ``needles`` keys in the first quarter get ``8·w``, the last ``window`` prompt queries and every decoded
      query ``7·w``: a boost of 7 for the queries that look for them.

    With the defaults the decoded queries put about a quarter of their attention on the needles, a quarter on the
    heavy hitters, and most of the prompt's queries (outside the window) three quarters on their last ``band`` keys.
    """
    n, d = p.context + p.decode, p.head_dim
    q, k, v = (torch.randn(p.batch, p.heads, n, d, generator=g) for _ in range(3))
    unit = torch.nn.functional.normalize
    freqs = (math.pi / p.band) * torch.linspace(0.05, 1.0, d // 4)
    angle = torch.arange(n).unsqueeze(1) * freqs
    code = torch.cat([angle.cos(), angle.sin()], 1) * (6.0 / math.sqrt(d // 4))  # (n, d/2), norm 6
    q[..., : d // 2] += code
    k[..., : d // 2] += code
    hitter = unit(torch.randn(p.heads, 1, d, generator=g), dim=-1)
    hitters = torch.cat([torch.zeros(1, dtype=torch.long),
                         torch.randperm(p.context - 1, generator=g)[: p.hitters - 1] + 1])
    k[:, :, hitters] += 8.0 * hitter
    q += 3.0 * hitter
    needle = unit(torch.randn(p.heads, 1, d, generator=g), dim=-1)
    where = torch.randperm(p.context // 4, generator=g)[: p.needles]
    k[:, :, where] += 8.0 * needle
    q[:, :, p.context - p.window :] += 7.0 * needle
    c = p.context
    return q[:, :, :c], k[:, :, :c], v[:, :, :c], q[:, :, c:], k[:, :, c:], v[:, :, c:]


def layer_outputs(inputs: Sequence[torch.Tensor], press: Press | None) -> torch.Tensor:
    """The decoded tokens' outputs after prefilling the prompt through ``attnzoo.prefill(press=press)``."""
    q, k, v, qd, kd, vd = inputs
    with torch.no_grad():
        _, state = az.prefill(q, k, v, method="softmax", press=press, layer=0)
        return az.step(state, qd, kd, vd)[0]


def build(
    info: PressInfo, fraction: float, calibration: Callable[[], Calibration], inner: PressInfo | None = None,
) -> Press:
    """``info``'s press for a budget of ``fraction``: ``info.cls.for_budget(fraction, **options)`` with the options
    its ``needs`` ask for: ``press=`` ``inner``'s press at the same budget (wrappers), ``calibration=calibration()``
    (presses that need training or calibration). Raises :class:`NotImplementedError` with the reason when the press
    needs what the suite cannot give (or does not define ``for_budget``)."""
    missing = [n for n in info.needs if n not in PROVIDED]
    if missing:
        raise NotImplementedError(f"needs {', '.join(missing)}, which this test bed does not provide")
    options: dict[str, Any] = {}
    if "press" in info.needs:
        if inner is None:
            raise NotImplementedError("wraps a press, and no scoring press is registered to wrap")
        options["press"] = inner.cls.for_budget(fraction)
    if {"training", "calibration"} & set(info.needs):
        if not _takes(info.cls.for_budget, "calibration"):
            raise NotImplementedError(f"needs {', '.join(info.needs)}, but {info.name}.for_budget takes no "
                                      "calibration= data")
        options["calibration"] = calibration()
    try:
        return info.cls.for_budget(fraction, **options)
    except NotImplementedError:
        raise NotImplementedError(f"{info.name} defines no for_budget (it is configured by hand)") from None
    except TypeError as e:
        if "calibration" not in options or "calibration" not in str(e):
            raise
        raise NotImplementedError(f"needs {', '.join(info.needs)}, but {info.name}.for_budget does not take "
                                  f"calibration= data ({e})") from None


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name, or through ``**options``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def wrapped(infos: Sequence[PressInfo]) -> PressInfo | None:
    """The press wrappers wrap (``needs`` "press"): SnapKV when registered, else the first scoring press that needs
    nothing the suite must supply."""
    plain = [i for i in infos if issubclass(i.cls, ScorerPress) and set(i.needs) <= {"queries", "layer"}]
    return next((i for i in plain if i.name == "SnapKVPress"), plain[0] if plain else None)


def label(info: PressInfo, inner: PressInfo | None) -> str:
    """A press's name in the tables: a wrapper's with the press it wraps, ``AdaKVPress(SnapKVPress)``."""
    return f"{info.name}({inner.name})" if "press" in info.needs and inner is not None else info.name


def _row(info: PressInfo | None, test: str, fraction: float, inner: PressInfo | None = None) -> dict[str, Any]:
    return {"press": label(info, inner) if info else FULL_CACHE, "mechanism": info.mechanism if info else "",
            "paper": info.paper if info else "", "arxiv": info.arxiv if info else None, "test": test,
            "budget": fraction}


def _measured(row: dict[str, Any], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` with ``work()``'s figures and status ``ok``, or the failure's status and reason."""
    started = time.perf_counter()
    try:
        return {**row, **work(), "status": "ok", "reason": "", "wall_s": time.perf_counter() - started}
    except NotImplementedError as e:
        return {**row, "status": "skipped", "reason": str(e) or "not implemented"}
    except Exception as e:  # a failing press is recorded; the suite goes on
        status, reason = classify(e)
        return {**row, "status": status, "reason": reason}


def retrieval_rows(
    model: RetrievalLM, cfg: PressSuite, infos: Sequence[PressInfo], inner: PressInfo | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The full cache's accuracy, then every press's at every budget (``bytes_fraction``/``tokens_fraction``: the
    first layer's cache after the prompt against the full cache's)."""
    data = retrieval_batch(cfg.task, cfg.sequences, torch.Generator().manual_seed(cfg.seed + 1))
    calib: list[Calibration] = []

    def calibration() -> Calibration:
        if not calib:
            sample = retrieval_batch(cfg.task, cfg.calibration_sequences, torch.Generator().manual_seed(cfg.seed + 2))
            calib.append(layer_inputs(model, sample.context))
        return calib[0]

    full = evaluate(model, data, None, cfg.chunk)
    rows = [{**_row(None, "retrieval", 1.0), **full, "bytes_fraction": 1.0, "tokens_fraction": 1.0, "status": "ok",
             "reason": ""}]
    echo(f"retrieval, full cache: accuracy {full['accuracy']:.3f}")
    for info in infos:
        for fraction in cfg.budgets:
            def work(info: PressInfo = info, fraction: float = fraction) -> dict[str, Any]:
                got = evaluate(model, data, build(info, fraction, calibration, inner), cfg.chunk)
                return {**got, "bytes_fraction": got["cache_bytes"] / full["cache_bytes"],
                        "tokens_fraction": got["cache_tokens"] / full["cache_tokens"]}

            rows.append(_measured(_row(info, "retrieval", fraction, inner), work))
            echo(_line(rows[-1], "accuracy", ".3f"))
    return rows


def layer_rows(
    cfg: PressSuite, infos: Sequence[PressInfo], inner: PressInfo | None = None, echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every press's relative L2 error of one attention layer against the full cache, at every budget."""
    inputs = planted_inputs(cfg.planted, torch.Generator().manual_seed(cfg.seed + 3))
    full = layer_outputs(inputs, None)
    other = planted_inputs(cfg.planted, torch.Generator().manual_seed(cfg.seed + 4))

    def calibration() -> Calibration:
        return [other[:3]]

    rows = []
    for info in infos:
        for fraction in cfg.budgets:
            def work(info: PressInfo = info, fraction: float = fraction) -> dict[str, Any]:
                out = layer_outputs(inputs, build(info, fraction, calibration, inner))
                return {"rel_l2": float(torch.linalg.vector_norm(out - full) / torch.linalg.vector_norm(full))}

            rows.append(_measured(_row(info, "layer_error", fraction, inner), work))
            echo(_line(rows[-1], "rel_l2", ".3g"))
    return rows


def _line(row: dict[str, Any], metric: str, spec: str) -> str:
    what = f"{row['test']}, {row['press']} at {row['budget']:.0%}"
    if row["status"] != "ok":
        return f"{what}: {row['status']}: {row['reason']}"
    return f"{what}: {metric} {format(row[metric], spec)}"


def select(patterns: list[str] | None, infos: Sequence[PressInfo] | None = None) -> list[PressInfo]:
    """The registered presses (or ``infos``) whose names match one of ``patterns`` (``fnmatch``; all without)."""
    if infos is None:
        import attnzoo.kv.presses  # noqa: F401  (registers every press)
        from attnzoo.kv.presses import presses

        infos = presses()
    if not patterns:
        return list(infos)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(i.name, p) for i in infos)]
    if unmatched:
        raise fail("--cases", f"names of registered presses ({', '.join(i.name for i in infos) or 'none'})",
                   unmatched)
    return [i for i in infos if any(fnmatch.fnmatchcase(i.name, p) for p in patterns)]


def run(
    out: Path, infos: Sequence[PressInfo], cfg: PressSuite = FULL, command: str = "", threads: int | None = None,
    inner: PressInfo | None = None, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or load) the model, measure every press in ``infos`` (wrappers around ``inner``, see :func:`wrapped`),
    write results.json, the report and presses.md.
    Torch runs on ``threads`` intra-op threads (default 1: on a shared 2-core machine two threads make these small
    calls many times slower)."""
    from attnzoo.bench.suites import cpu_run
    from attnzoo.bench.tables import press_markdown

    config = {"suite": "presses", "presses": [i.name for i in infos], "task": asdict(cfg.task),
              "training": asdict(cfg.training), "sequences": cfg.sequences, "budgets": list(cfg.budgets),
              "planted": asdict(cfg.planted), "seed": cfg.seed, "wrapped": inner.name if inner else None}
    with cpu_run(out, command, config, threads, ("presses.md", press_markdown)) as results:
        echo("press model: loading or training ...")
        model, info = trained_model(cfg.task, cfg.training, out / "press-model")
        results["config"]["model"] = {k: v for k, v in info.items() if k not in ("task", "training")}
        how = "loaded from cache" if info["cached"] else f"trained in {info['train_s']:.0f} s"
        echo(f"press model: {how}, final loss {info['final_loss']:.3g}")
        results["presses"] += retrieval_rows(model, cfg, infos, inner, echo)
        results["presses"] += layer_rows(cfg, infos, inner, echo)
    return results
