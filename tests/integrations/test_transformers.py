"""attnzoo methods inside tiny randomly initialised transformers models (nothing downloaded): exact methods give the
model's own ``sdpa`` logits for prefill, left/right-padded batches and ``generate()``; methods without masks handle
padding; the linear family decodes through its state; bad configurations fail at ``configure``."""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo.integrations.transformers as azhf  # noqa: E402
from attnzoo import AttnzooError  # noqa: E402

SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "vocab_size": 100}
DECODERS = ("llama", "qwen2")


def build(kind: str) -> torch.nn.Module:
    """A tiny fp32 model in eval mode, the same weights for the same ``kind``."""
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(**SIZES, attn_implementation="sdpa")
        return transformers.BertModel(config).eval()
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    config = config_class(**SIZES, num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(3, 12)`` and their attention mask: one full row, two padded ones (left for decoders, right for
    the encoder)."""
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pads = [0, 3, 7]
    for row, n in enumerate(pads):
        if n:
            mask[row, :n] = 0 if kind in DECODERS else 1
            if kind not in DECODERS:
                mask[row, -n:] = 0
    return ids, mask


@torch.no_grad()
def outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (decoders) or last hidden states (encoder) of the real tokens."""
    out = model(ids, attention_mask=mask)
    values = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return values[mask.bool()]


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> transformers.utils.ModelOutput:
    return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize(("method", "params"), [("softmax", {}), ("sliding_window", {"window": 64})])
def test_exact_methods_reproduce_sdpa(kind: str, method: str, params: dict) -> None:
    model = build(kind)
    ids, mask = batch(kind)
    expected = outputs(model, ids, mask)
    one = outputs(model, ids[:1], mask[:1])
    azhf.configure(model, method, **params)
    assert model.config._attn_implementation == f"attnzoo_{method}"
    assert (outputs(model, ids, mask) - expected).abs().max() <= 1e-5
    assert (outputs(model, ids[:1], mask[:1]) - one).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize(("method", "params"), [("softmax", {}), ("sliding_window", {"window": 64})])
def test_generate_gives_the_sdpa_tokens(kind: str, method: str, params: dict) -> None:
    model = build(kind)
    ids, mask = batch(kind)
    expected = greedy(model, ids, mask)
    azhf.configure(model, method, **params)
    got = greedy(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    assert (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max() <= 1e-5


def test_a_window_shorter_than_the_sequence_changes_the_logits_of_chosen_layers_only() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    expected = outputs(model, ids, mask)
    azhf.configure(model, "sliding_window", layers=[1], window=2)
    modules = azhf.attention_modules(model)
    assert [x.attnzoo_settings["sliding_window"] for x in modules] == [
        azhf.LayerSetting("softmax", {}), azhf.LayerSetting("sliding_window", {"window": 2})]
    assert (outputs(model, ids, mask) - expected).abs().max() > 1e-3
    model.set_attn_implementation("attnzoo_softmax")  # another implementation: the window's setting stays out
    assert (outputs(model, ids, mask) - expected).abs().max() <= 1e-5


def full_forward(model: torch.nn.Module, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of one forward over whole generated sequences, with generate's positions (left padding skipped)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("method", ["linear", "lightning", "momentum", "urpe"])
def test_a_method_decodes_through_its_state_inside_generate(method: str) -> None:
    """Linear methods through their fixed-size state; KV-cache methods that cannot read transformers' cache
    (momentum, URPE: self-attention only) through their own attnzoo cache."""
    model = build("llama")
    ids, mask = batch("llama")
    azhf.configure(model, method)
    got = greedy(model, ids, mask)
    ties = [x.attnzoo_decode for x in azhf.attention_modules(model)]
    assert all(t.seq_kv == got.sequences.shape[1] - 1 and t.state.length == t.seq_kv for t in ties)
    steps = len(got.logits)
    full_mask = torch.cat([mask, torch.ones(3, steps, dtype=mask.dtype)], dim=1)
    full = full_forward(model, got.sequences, full_mask)
    assert (torch.stack(got.logits, 1) - full[:, ids.shape[1] - 1 : -1]).abs().max() <= 1e-5


def test_a_step_that_does_not_continue_the_state_is_refused() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    azhf.configure(model, "linear")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        out.past_key_values.crop(-2)
        with pytest.raises(AttnzooError, match="cache: expected the keys of the prefill"):
            model(ids[:, -1:], cache=out.past_key_values,
                  attention_mask=mask[:, :-1])


def test_a_method_that_cannot_read_a_cache_says_so_and_generates_without_one() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    azhf.configure(model, "gated_delta")  # per-token gates: the model gives none per step
    with pytest.raises(AttnzooError, match=r"cache: expected none \(method 'gated_delta'.*use_cache=False\), got 1 q"):
        greedy(model, ids, mask)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             use_cache=False)
    assert got.shape == (3, 14)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_method_without_masks_attends_each_sequence_over_its_real_tokens(kind: str) -> None:
    model = build(kind)
    ids, mask = batch(kind)
    azhf.configure(model, "linear")
    positions = {} if kind == "bert" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    out = model(ids, attention_mask=mask, **positions)  # with gradients: never through a decoding state
    together = (out.logits if kind != "bert" else out.last_hidden_state)[mask.bool()].detach()
    alone = []
    for row in range(3):
        real = mask[row].bool()
        own = {} if kind == "bert" else {"position_ids": (mask[row : row + 1].cumsum(-1) - 1)[:, real]}
        with torch.no_grad():
            out = model(ids[row : row + 1, real], **own)
        alone.append((out.logits if kind != "bert" else out.last_hidden_state)[0])
    assert (together - torch.cat(alone)).abs().max() <= 1e-5
    if kind != "bert":
        with torch.no_grad():  # the same through the decoding state's prefill (left padding shifted away)
            assert (model(ids, attention_mask=mask, **positions).logits[mask.bool()] - together).abs().max() <= 1e-5


def test_a_method_without_masks_refuses_a_mask_beyond_padding() -> None:
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, 0, 3, 0] = False
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(AttnzooError, match=r"attention_mask: expected padding only.*'linear' takes no mask"):
        azhf.attend(torch.nn.Module(), azhf.get("linear"), q, k, v, mask, True, None, {})


def test_the_attention_function_returns_batch_seq_heads() -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = torch.nn.Module()
    module.is_causal = True
    out, weights = azhf.attention_function("softmax")(module, q, k, v, None, scaling=0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    assert weights is None and out.shape == (2, 5, 4, 8)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "method", "params", "layers", "message"),
    [
        ("llama", "agent", {}, None, r"method: expected a method supporting the self/causal pattern of LlamaAttention"),
        ("bert", "lightning", {}, None, r"self/noncausal pattern of BertSelfAttention of layer 0, got 'lightning'"),
        ("llama", "sliding_window", {"windw": 4}, None, r"windw: unknown parameter for method 'sliding_window'"),
        ("llama", "sliding_window", {"window": -1}, None, r"window: expected >= 0"),
        ("llama", "softmax", {}, [5], r"layers: expected layer indices of the model \(\[0, 1\]\), got \[5\]"),
        ("llama", "no_such_method", {}, None, r"unknown method 'no_such_method'"),
    ],
)
def test_bad_configurations_fail_at_configure(kind, method, params, layers, message) -> None:
    model = build(kind)
    with pytest.raises(AttnzooError, match=message):
        azhf.configure(model, method, layers=layers, **params)
    assert model.config._attn_implementation == "sdpa"


def test_training_with_attention_dropout_fails_at_configure() -> None:
    model = build("bert").train()
    with pytest.raises(AttnzooError, match="training with attention dropout 0.1"):
        azhf.configure(model, "softmax")


def test_register_names_every_method_with_a_self_pattern() -> None:
    names = azhf.register()
    assert "attnzoo_softmax" in names and "attnzoo_linear" in names and "attnzoo_maxvit_block" in names
    assert "attnzoo_softmax" in transformers.AttentionInterface().valid_keys()
    masking = importlib.import_module("transformers.masking_utils")
    assert masking.AttentionMaskInterface()["attnzoo_softmax"] is masking.sdpa_mask


def test_a_model_set_up_by_name_takes_parameters_from_its_config() -> None:
    azhf.register()
    model = build("llama")
    ids, mask = batch("llama")
    model.config.attnzoo_params = {"window": 2}
    model.set_attn_implementation("attnzoo_sliding_window")
    windowed = outputs(model, ids, mask)
    azhf.configure(model, "sliding_window", window=2)
    assert (outputs(model, ids, mask) - windowed).abs().max() == 0


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(AttnzooError, match=r'transformers: expected the package installed \(the hf extra: pip install'):
        azhf.register()

