"""``attnzoo bench``: CAB-style efficiency and quality benchmark of every registered method.

For each method × backend × supported pattern (self/cross × causal/noncausal) × length × {fwd, fwd+bwd}: median and
spread of wall time, peak memory, FLOPs and ratios to ``scaled_dot_product_attention`` measured in the same run; the
efficiency length where a method's fitted cost curve crosses SDPA's; peak memory in a fresh process for methods that
promise sub-quadratic memory; error against softmax for approximate methods; accuracy on synthetic tasks (MQAR,
induction copy, selective copy) with ``attnzoo.nn.Attention``. Writes ``results.json``, ``summary.md``, PNG plots and a
self-contained ``report.html`` (see docs/bench.md).

``--suite NAME`` runs a named suite instead (:mod:`attnzoo.bench.suites`): the cases behind docs/benchmarks.md, each
printed with its floor; ``--suite presses`` measures every registered KV-cache press against cache budgets
(:mod:`attnzoo.bench.suites.presses`); ``--suite fidelity`` swaps every noncausal method into a pretrained sentence
encoder (:mod:`attnzoo.bench.suites.fidelity`); ``--suite quality`` trains every causal method on MQAR, induction and
selective copy as Zoology does, resumably (:mod:`attnzoo.bench.suites.quality`; ``--full`` sizes it for a GPU).

The CLI calls :func:`add_arguments` and :func:`main`; ``python -m attnzoo.bench`` does the same on its own.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from attnzoo.errors import AttnzooError, fail

__all__ = ["add_arguments", "main"]

PHASES = ("efficiency", "approximation", "quality", "fresh")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    p = parser
    p.add_argument("--quick", action="store_true",
                   help="sized for a 2-core CPU: every method, lengths 512-4096 (quadratic ones to 2048), one tiny "
                        "quality task (< 3 min)")
    p.add_argument("--full", action="store_true",
                   help="with --suite quality: the study sized for a GPU (more pairs, widths, rates, seeds, steps)")
    p.add_argument("--methods", type=_csv, default=None, help="comma-separated method names (default: all registered)")
    p.add_argument("--patterns", type=_csv, default=None,
                   help="comma-separated patterns among self/noncausal, self/causal, cross/noncausal, cross/causal")
    p.add_argument("--lengths", type=_ints, default=None, help="comma-separated sequence lengths for the forward pass")
    p.add_argument("--bwd-lengths", type=_ints, default=None, help="lengths for forward+backward (default: per mode)")
    p.add_argument("--modes", type=_csv, default=None, help="fwd, fwd+bwd or both (default: both)")
    p.add_argument("--backends", type=_csv, default=None,
                   help="backends to measure, e.g. torch,flex,triton,sdpa,reference (default: every fast path)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None, help="fewer key/value heads than --heads measures GQA")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the cases (default: 1 with --quick, else torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per case")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is stopped (timeout)")
    p.add_argument("--steps", type=int, default=None, help="training steps per quality case (equal for every method)")
    p.add_argument("--phases", type=_csv, default=None,
                   help="efficiency,approximation,quality,fresh (default: all four; fresh: peak memory in a fresh "
                        "process for methods with sub-quadratic memory)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers your own methods); repeatable")
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this process instead of a worker (no timeout or crash isolation)")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="attnzoo-bench", help="output directory (default: attnzoo-bench/)")
    p.add_argument("--suite", default=None, metavar="NAME",
                   help="run a named suite (the cases of docs/benchmarks.md; 'floors' = every case with a floor) "
                        "instead of the sweep; '--suite list' lists the suites and their cases")
    p.add_argument("--cases", type=_csv, default=None, metavar="NAMES",
                   help="with --suite: only the cases with these names (comma-separated; * and ? patterns)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="show what got faster or slower from run A to run B (and write compare.html next to B), "
                        "then exit")
    p.add_argument("--threshold", type=float, default=0.1, help="relative change --compare reports (default 0.1)")


def _config(args: argparse.Namespace):
    import torch

    from attnzoo.bench import sweep

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith(("cpu", "cuda")):
        raise fail("--device", "cpu or cuda[:index]", repr(device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise fail("--device", "a device this machine has (no CUDA device found)", repr(device))
    base = sweep.quick_config() if args.quick else sweep.full_config()
    base.device = device
    base.dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    for name in ("methods", "patterns", "backends", "batch", "heads", "kv_heads", "head_dim", "repeats", "warmup",
                 "seed", "phases", "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(base, name, value)
    if args.patterns is not None:
        base.bwd_patterns = None  # the patterns asked for, in both modes
    if args.lengths is not None:
        base.lengths = args.lengths
        base.bwd_lengths = args.bwd_lengths or ([min(args.lengths)] if args.quick else args.lengths)
    elif args.bwd_lengths is not None:
        base.bwd_lengths = args.bwd_lengths
    modes = args.modes or ["fwd", "fwd+bwd"]
    unknown = [m for m in modes if m not in ("fwd", "fwd+bwd")]
    if unknown:
        raise fail("--modes", "fwd and/or fwd+bwd", unknown)
    if "fwd" not in modes:
        base.lengths = []
    if "fwd+bwd" not in modes:
        base.bwd_lengths = []
    if args.steps is not None:
        if args.steps < 1:
            raise fail("--steps", "a positive integer", args.steps)
        base.model = {**base.model, "steps": args.steps}
    if args.case_timeout is not None:
        base.case_timeout_s = args.case_timeout
    bad = [p for p in base.phases if p not in PHASES]
    if bad:
        raise fail("--phases", f"some of {', '.join(PHASES)}", bad)
    for name in ("batch", "heads", "head_dim", "repeats", "threads"):
        if getattr(base, name) is not None and getattr(base, name) < 1:
            raise fail(f"--{name.replace('_', '-')}", "a positive integer", getattr(base, name))
    base.imports = list(args.imports)
    base.isolate = not args.in_process
    return base


def _command() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:  # called as `attnzoo bench ...` rather than `python -m attnzoo.bench ...`
        argv = argv[1:]
    return "attnzoo bench " + " ".join(shlex.quote(a) for a in argv)


def _run_suite(args: argparse.Namespace) -> int:
    """``--suite``: list the suites, or run the chosen cases. Exit status 0 when every floor holds, 1 when one does
    not, 130 when interrupted."""
    from attnzoo.bench import suites
    from attnzoo.bench.suites import runner
    from attnzoo.bench.tables import md_table, suite_table

    if args.suite == "list":
        print(suites.listing())
        return 0
    if args.suite == suites.PRESSES:
        return _run_presses(args)
    if args.suite == suites.FIDELITY:
        return _run_fidelity(args)
    if args.suite == suites.DYNAMIC:
        return _run_dynamic(args)
    if args.suite == suites.QUALITY:
        return _run_quality(args)
    if args.full:
        raise fail("--full", "--suite quality with it", f"--full with --suite {args.suite}")
    cases = suites.select(args.suite, args.cases)
    device = args.device or "cpu"
    if not device.startswith(("cpu", "cuda")):
        raise fail("--device", "cpu or cuda[:index]", repr(device))
    out = Path(args.out)
    results = runner.run(cases, out, command=_command(), device=device, threads=args.threads)
    print(md_table(*suite_table(results)))
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  results: {out / 'results.json'}")
    if results["status"] != "complete":
        return 130
    return 1 if any(r.get("passed") is False for r in results["suites"]) else 0


def _run_presses(args: argparse.Namespace) -> int:
    """``--suite presses``: every registered press (or those ``--cases`` names) at every budget; prints the
    leaderboard. Exit status 0, or 130 when interrupted."""
    from attnzoo.bench.suites import presses
    from attnzoo.bench.tables import md_table, press_leaderboard

    if args.device not in (None, "cpu"):
        raise fail("--device", "cpu (the press suite runs on the CPU)", repr(args.device))
    out = Path(args.out)
    results = presses.run(out, presses.select(args.cases), command=_command(), threads=args.threads,
                          inner=presses.wrapped(presses.select(None)))
    print(md_table(*press_leaderboard(results)))
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  tables for docs: {out / 'presses.md'}")
    return 0 if results["status"] == "complete" else 130


def _run_fidelity(args: argparse.Namespace) -> int:
    """``--suite fidelity``: every noncausal method (or the settings ``--cases`` names) inside all-MiniLM-L6-v2;
    prints the ranked table. Exit status 0, or 130 when interrupted."""
    from attnzoo.bench.suites import fidelity
    from attnzoo.bench.tables import fidelity_table, md_table

    if args.device not in (None, "cpu"):
        raise fail("--device", "cpu (the fidelity suite runs on the CPU)", repr(args.device))
    out = Path(args.out)
    results = fidelity.run(out, args.cases, command=_command(), threads=args.threads)
    print(md_table(*fidelity_table(results)))
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  table for docs: {out / 'fidelity.md'}")
    return 0 if results["status"] == "complete" else 130


def _run_dynamic(args: argparse.Namespace) -> int:
    """``--suite dynamic``: every D-family method (or those ``--cases`` names) at equal density; prints both tables.
    Exit status 0, or 130 when interrupted."""
    from attnzoo.bench.suites import dynamic
    from attnzoo.bench.tables import dynamic_table, md_table, recall_table

    if args.device not in (None, "cpu"):
        raise fail("--device", "cpu (the dynamic suite runs on the CPU)", repr(args.device))
    out = Path(args.out)
    results = dynamic.run(out, args.cases, command=_command(), threads=args.threads)
    print(md_table(*dynamic_table(results)))
    print(md_table(*recall_table(results)))
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  tables for docs: {out / 'dynamic.md'}")
    return 0 if results["status"] == "complete" else 130


def _run_quality(args: argparse.Namespace) -> int:
    """``--suite quality``: the study (``--full``: its GPU size) for every causal method (or those ``--cases``
    names), resuming from what ``--out`` already holds; prints the table. Exit status 0, or 130 when interrupted."""
    from dataclasses import replace

    import torch

    from attnzoo.bench.suites import quality
    from attnzoo.bench.tables import md_table, study_table

    study = quality.FULL if args.full else quality.CPU
    device = args.device or study.device
    if not device.startswith(("cpu", "cuda")):
        raise fail("--device", "cpu or cuda[:index]", repr(device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise fail("--device", "a device this machine has (no CUDA device found; --device cpu runs it on the CPU)",
                   repr(device))
    changes: dict = {"device": device}
    for name in ("threads", "steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise fail(f"--{name}", "a positive integer", value)
            changes[name] = value
    out = Path(args.out)
    results = quality.run(out, args.cases, replace(study, **changes), command=_command())
    print(md_table(*study_table(results)))
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  table for docs: {out / 'quality.md'}  "
          f"journal: {out / quality.JOURNAL}")
    return 0 if results["status"] == "complete" else 130


def main(args: argparse.Namespace) -> int:
    """Run ``attnzoo bench`` with parsed ``args``; returns the exit status (130 when interrupted, 2 for bad options;
    with ``--suite``, 1 when a floor does not hold)."""
    from attnzoo.bench import compare, sweep

    try:
        if args.compare:
            print(compare.main(args.compare[0], args.compare[1], args.threshold,
                               html_path=Path(args.compare[1]).parent / "compare.html"))
            return 0
        import importlib

        import attnzoo  # noqa: F401  (registers the methods)

        for name in args.imports:
            importlib.import_module(name)
        if args.suite:
            return _run_suite(args)
        if args.cases:
            raise fail("--cases", "--suite NAME with it", "--cases without --suite")
        if args.full:
            raise fail("--full", "--suite quality with it", "--full without --suite")
        cfg = _config(args)
        out = Path(args.out)
        results = sweep.run(cfg, out, command=_command(), progress=not args.no_progress)
    except AttnzooError as e:
        print(f"attnzoo bench: {e}", file=sys.stderr)
        return 2
    sweep.summary_table(results)
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}  results: {out / 'results.json'}")
    return 0 if results["status"] == "complete" else 130
