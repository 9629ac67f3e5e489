"""Presses around ``generate()`` of tiny random transformers models (nothing downloaded): the cache the model holds is
a :class:`PressedCache` of attnzoo caches, so compression really shrinks it; a press keeping everything gives the
``sdpa`` tokens and logits; left-padded rows decode as they do alone; per-head (AdaKV) and decoding-time presses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo.integrations.transformers as azhf  # noqa: E402
from attnzoo import AttnzooError  # noqa: E402
from attnzoo.integrations.hf_cache import PressedCache, PressedLayer  # noqa: E402
from attnzoo.kv.cache import KVCache  # noqa: E402
from attnzoo.kv.presses.adakv import AdaKVPress  # noqa: E402
from attnzoo.kv.presses.base import PressContext, ScorerPress  # noqa: E402
from attnzoo.kv.presses.decoding import DecodingPress  # noqa: E402
from attnzoo.kv.presses.snapkv import SnapKVPress  # noqa: E402
from attnzoo.kv.ragged import RaggedKVCache  # noqa: E402
from tests.integrations.test_transformers import DECODERS, SIZES, batch, build, greedy  # noqa: E402


@dataclass(frozen=True)
class RecentPress(ScorerPress):
    """Keeps each sequence's most recent tokens (a test press: the score is the position)."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return cache.positions.float()


def pressed_layers(cache: PressedCache) -> list[PressedLayer]:
    assert isinstance(cache, PressedCache) and len(cache.layers) == SIZES["num_hidden_layers"]
    return cache.layers


@pytest.mark.parametrize("kind", DECODERS)
def test_a_press_keeping_everything_gives_the_sdpa_tokens_and_logits(kind: str) -> None:
    model = build(kind)
    ids, mask = batch(kind)
    expected = greedy(model, ids, mask)
    with azhf.press(model, RecentPress(compression_ratio=0.0)) as pressed:
        got = greedy(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    assert (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max() <= 1e-5
    assert got.cache is pressed.cache and model.config._attn_implementation == "sdpa"
    steps = len(got.logits) - 1  # the last token is not fed back
    real = mask.sum(-1)
    for layer in pressed_layers(got.cache):
        assert torch.equal(layer.cache.token_counts(), (real + steps).view(3, 1).expand(3, 2))
        assert layer.get_seq_length() == ids.shape[1] + steps == expected.cache.get_seq_length()


def test_the_models_cache_holds_the_kept_tokens_only_at_their_true_positions() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True).cache
    with azhf.press(model, SnapKVPress(compression_ratio=0.5, window_size=4)) as pressed, torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
    real = mask.sum(-1)  # 12, 9, 5 real tokens: 6, 5, 3 kept
    kept = real - real // 2
    for index, layer in enumerate(pressed_layers(cache)):
        assert isinstance(layer.cache, KVCache) and layer.keys.shape == (3, 2, 6, 16)
        assert torch.equal(layer.cache.token_counts(), kept.view(3, 1).expand(3, 2))
        assert torch.equal(layer.cache.length, real)
        positions = layer.cache.positions
        assert bool(((positions < real.view(3, 1, 1)) & (positions >= -1)).all())
        assert bool((positions.max(-1).values == (real - 1).view(3, 1)).all())  # SnapKV keeps its window
        assert layer.get_seq_length() == 12 and cache.get_mask_sizes(1, index) == (7, 0)
        assert pressed.pressed_bytes[index] == layer.nbytes == layer.cache.nbytes
        assert pressed.full_bytes[index] == azhf.cache_bytes(full) // 2 == 3 * 2 * 12 * 16 * 4 * 2
    assert azhf.cache_bytes(cache) == sum(pressed.pressed_bytes.values()) < azhf.cache_bytes(full) * 0.6
    assert all(x.attnzoo_press is None for x in azhf.attention_modules(model))


def test_left_padded_rows_decode_through_the_compressed_cache_as_they_do_alone() -> None:
    model = build("qwen2")
    ids, mask = batch("qwen2")
    ids, mask = ids[1:], mask[1:]  # 9 and 5 real tokens, left padded
    press = RecentPress(compression_ratio=0.5)
    with azhf.press(model, press):
        together = greedy(model, ids, mask)
    for row in range(2):
        real = mask[row].bool()
        with azhf.press(model, press):
            alone = greedy(model, ids[row : row + 1, real], mask[row : row + 1, real])
        assert torch.equal(together.sequences[row, ids.shape[1] :], alone.sequences[0, real.sum() :])
        assert (torch.stack(together.logits)[:, row] - torch.stack(alone.logits)[:, 0]).abs().max() <= 1e-5
    steps = len(together.logits) - 1
    for layer in pressed_layers(together.cache):
        assert torch.equal(layer.cache.token_counts(), torch.tensor([[5 + steps] * 2, [3 + steps] * 2]))
        assert torch.equal(layer.cache.length, torch.tensor([9, 5]) + steps)


def test_adakv_per_head_budgets_shrink_the_models_cache() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    with azhf.press(model, AdaKVPress(SnapKVPress(compression_ratio=0.5, window_size=4), page_size=4)) as pressed:
        got = greedy(model, ids, mask)
        held = dict(pressed.pressed_bytes)
        with torch.no_grad():
            prompt = model(ids, attention_mask=mask, use_cache=True).cache
    real = mask.sum(-1)
    for layer in pressed_layers(prompt):
        assert isinstance(layer.cache, RaggedKVCache)
        assert torch.equal(layer.cache.token_counts().sum(-1), 2 * (real - real // 2))  # per sequence, over heads
    steps = len(got.logits) - 1
    for index, layer in enumerate(pressed_layers(got.cache)):
        assert torch.equal(layer.cache.token_counts().sum(-1), 2 * (real - real // 2 + steps))
        assert held[index] == layer.nbytes < layer.full_nbytes
    assert got.sequences.shape == (3, ids.shape[1] + 5)


def test_a_decoding_press_keeps_the_models_cache_bounded() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    with azhf.press(model, DecodingPress(RecentPress(), target_size=4, interval=3)), torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    for layer in pressed_layers(got.cache):
        counts = layer.cache.token_counts()
        assert bool((counts < 4 + 3).all()) and bool((counts >= 4).all())
        assert torch.equal(layer.cache.length, mask.sum(-1) + 11)


def test_a_pressed_cache_continues_a_later_call_within_the_press() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[:, -1]
    with azhf.press(model, RecentPress(compression_ratio=0.0)), torch.no_grad():
        cache = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache
        logits = model(ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]  # positions from the columns
    assert (logits - expected).abs().max() <= 1e-5


def test_calls_without_a_cache_are_not_pressed() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    with azhf.press(model, RecentPress(compression_ratio=0.5)) as pressed, torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    assert pressed.cache is None and (logits - expected).abs().max() <= 1e-5


def test_what_a_pressed_cache_cannot_do_is_refused() -> None:
    model = build("llama")
    ids, mask = batch("llama")
    press = RecentPress(compression_ratio=0.5)
    with torch.no_grad():
        unpressed = model(ids, attention_mask=mask, use_cache=True).cache
    with azhf.press(model, press), torch.no_grad():
        with pytest.raises(AttnzooError, match=r"cache: expected None, an empty DynamicCache .* got a DynamicCache of"):
            model(ids[:, -1:], attention_mask=mask, cache=unpressed)
        with pytest.raises(AttnzooError, match=r"num_beams: expected 1 with a press"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0)
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        with pytest.raises(AttnzooError, match=r"cache: expected no rollback of a pressed cache"):
            cache.crop(-1)
    with pytest.raises(AttnzooError, match=r"cache: expected a pressed cache used within its press"), torch.no_grad():
        model(ids[:, -1:], cache=cache)


def test_a_press_needs_full_attention_through_a_kv_cache() -> None:
    model = build("llama")
    azhf.configure(model, "linear")
    kv_cache = r"press: expected a model attending by a method that decodes through a KV cache"
    with pytest.raises(AttnzooError, match=kv_cache), azhf.press(model, RecentPress(compression_ratio=0.5)):
        pass
    with pytest.raises(AttnzooError, match="press: expected a Press"), azhf.press(model, "snapkv"):
        pass
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**SIZES, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=0, attn_implementation="sdpa")
    windowed = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(AttnzooError, match="model: expected full-attention layers under a press"), azhf.press(
            windowed, RecentPress(compression_ratio=0.5)):
        pass


# -- azhf.decoding: the same cache without a press, for every method that decodes ---------------------------------


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> transformers.utils.ModelOutput:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, return_dict_in_generate=True)


@pytest.mark.parametrize(("method", "params"), [("softmax", {}), ("sliding_window", {"window": 8}), ("linear", {}),
                                                ("momentum", {})])
def test_decoding_gives_the_tokens_and_logits_of_generate_without_it(method: str, params: dict) -> None:
    model = build("llama")
    ids, mask = batch("llama")  # left padded: 12, 9 and 5 real tokens
    azhf.configure(model, method, **params)
    expected = greedy(model, ids, mask)
    with azhf.decoding(model) as dec:
        got = greedy(model, ids, mask)
        assert all(x.attnzoo_decode is None for x in azhf.attention_modules(model))  # no state beside the cache
    assert torch.equal(got.sequences, expected.sequences) and got.sequences.shape[1] > 8 + 1  # past the window
    assert (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max() <= 1e-5
    assert got.cache is dec.cache and azhf.cache_bytes(got.cache) == sum(dec.pressed_bytes.values())
    steps = len(got.logits) - 1
    for layer in pressed_layers(got.cache):
        assert layer.state.method == method and layer.get_seq_length() == ids.shape[1] + steps
        if method == "linear":
            assert not layer.holds_kv and layer.keys is None and isinstance(layer.cache, torch.Tensor)
        elif method == "sliding_window":
            assert layer.cache.ring == 9 and layer.keys.shape == (3, 2, 9, 16)
        else:
            assert torch.equal(layer.cache.token_counts(), (mask.sum(-1) + steps).view(3, 1).expand(3, 2))
    assert model.config._attn_implementation == f"attnzoo_{method}"


@pytest.mark.parametrize("method", ["sliding_window", "linear", "softmax"])
def test_a_window_and_a_linear_state_hold_the_same_bytes_as_generation_goes_on(method: str) -> None:
    model = build("llama")
    ids, mask = batch("llama")
    azhf.configure(model, method, **({"window": 8} if method == "sliding_window" else {}))
    with azhf.decoding(model):
        short, long = (azhf.cache_bytes(generate(model, ids, mask, new).cache) for new in (6, 30))
    full = azhf.cache_bytes(generate(model, ids, mask, 30).cache)  # transformers' DynamicCache
    assert full == 2 * 2 * 3 * 2 * (12 + 29) * 16 * 4
    if method == "softmax":
        assert short < long  # a KV cache grows with the sequence
    else:
        assert short == long < full / 3
    if method == "sliding_window":  # per layer: keys and values of 9 slots, their int32 positions
        assert long == 2 * (2 * 3 * 2 * 9 * 16 * 4 + 3 * 2 * 9 * 4)


def test_decoding_refuses_what_it_cannot_hold() -> None:
    model = build("llama")
    azhf.configure(model, "gated_delta")
    with pytest.raises(AttnzooError, match=r"method: expected a method that decodes without per-token parameters "
                       r"\(.*\), got layer 0 attending by 'gated_delta'"), azhf.decoding(model):
        pass
    model = build("llama")
    ids, mask = batch("llama")
    with azhf.decoding(model):
        with pytest.raises(AttnzooError, match=r"num_beams: expected 1 with a press or azhf.decoding"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0)
        assert model.config._attn_implementation == "attnzoo_softmax"
    assert model.config._attn_implementation == "sdpa"
