"""Hedgehog maps added to tiny randomly initialised transformers models and distilled from their softmax attention
(nothing downloaded): the maps are trainable parameters of the model, the model then attends by them (prefill,
padding, generate), only the chosen layers change, and the loss falls."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo.integrations.transformers as azhf  # noqa: E402
from attnzoo import AttnzooError  # noqa: E402
from attnzoo.integrations.distill import MAPS, add_hedgehog, distill_hedgehog  # noqa: E402
from tests.integrations.test_transformers import batch, build, outputs  # noqa: E402


def inputs(kind: str) -> list[dict[str, torch.Tensor]]:
    ids, mask = batch(kind)
    return [{"input_ids": ids, "attention_mask": mask}]


def test_the_maps_are_trainable_parameters_of_each_chosen_layer() -> None:
    model = build("llama")  # 4 heads, 2 KV heads of 16
    add_hedgehog(model, layers=[1])
    names = {n for n, _ in model.named_parameters() if MAPS in n}
    assert names == {f"model.layers.1.self_attn.{MAPS}.{p}" for p in ("q_weight", "q_bias", "k_weight", "k_bias")}
    maps = getattr(model.model.layers[1].self_attn, MAPS)
    assert maps["q_weight"].shape == (4, 16, 16) and maps["k_weight"].shape == (2, 16, 16)
    assert model.config._attn_implementation == "attnzoo_hedgehog"
    ids, mask = batch("llama")
    untouched = build("llama")
    azhf.configure(untouched, "hedgehog", layers=[1])  # identity maps = hedgehog's defaults
    assert (outputs(model, ids, mask) - outputs(untouched, ids, mask)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_distillation_lowers_the_loss_and_the_model_attends_by_the_maps(kind: str) -> None:
    model = build(kind)
    ids, mask = batch(kind)
    before = outputs(model, ids, mask)
    history = distill_hedgehog(model, inputs(kind), steps=30, lr=3e-2)
    assert len(history) == 31 and history[-1] < 0.7 * history[0]
    assert model.config._attn_implementation == "attnzoo_hedgehog"
    untrained = azhf.configure(build(kind), "hedgehog")
    # the distilled model is closer to the softmax one than hedgehog's starting point
    assert (outputs(model, ids, mask) - before).norm() < 0.8 * (outputs(untrained, ids, mask) - before).norm()
    trained = dict(getattr(azhf.attention_modules(model)[0], MAPS))
    assert not torch.equal(trained["q_weight"], torch.eye(16).expand(4, 16, 16))
    if kind == "llama":  # generate decodes through hedgehog's state with the fitted maps
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 15)


def test_a_second_distillation_continues_from_the_fitted_maps() -> None:
    model = build("bert")
    first = distill_hedgehog(model, inputs("bert"), steps=20, lr=3e-2)
    second = distill_hedgehog(model, inputs("bert"), steps=0)
    assert second[0] == pytest.approx(first[-1], rel=1e-4)


def test_bad_arguments_are_refused_naming_the_argument() -> None:
    model = build("bert")
    with pytest.raises(AttnzooError, match="steps"):
        distill_hedgehog(model, inputs("bert"), steps=-1)
    with pytest.raises(AttnzooError, match="batches"):
        distill_hedgehog(model, [], steps=1)
    with pytest.raises(AttnzooError, match="layers"):
        add_hedgehog(model, layers=[7])
    assert model.config._attn_implementation != "attnzoo_distill_capture"
