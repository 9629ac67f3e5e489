"""Every registered scoring press: exact kept counts for ratios and budgets on a ragged batch, kept slots are the
prompt's own (unless merged), bad ratios and budgets, and prefill + step through the API with B=2 ragged lengths."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import AttentionGate, AttentionGatePress, ScorerPress, presses
from tests.helpers import qkv

LENGTHS = torch.tensor([24, 17])
def _keep_all_gate() -> AttentionGate:
    """An untrained gate whose output weight is 0: every token's keep probability is σ(bias) = σ(2) (kept), so the
    flag mode of a ratio of 0 keeps everything, deterministically."""
    gate = AttentionGate(kv_heads=2, head_dim=8)
    with torch.no_grad():
        gate.w_o.zero_()
    return gate


REQUIRED = {  # what a scorer needs beyond its defaults, for this file's prompts (2 kv heads of dim 8)
    AttentionGatePress: lambda: {"gate": _keep_all_gate()},
}
SCORERS = [p.cls for p in presses() if issubclass(p.cls, ScorerPress)]


def build(press: type[ScorerPress], **options: object) -> ScorerPress:
    """The scorer with ``options`` and whatever it requires (:data:`REQUIRED`)."""
    return press(**REQUIRED.get(press, dict)(), **options)


def test_every_scorer_is_covered() -> None:
    """A scorer whose required fields have no default must say here how to build it."""
    for press in SCORERS:
        needs = [f.name for f in dataclasses.fields(press)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        assert not needs or press in REQUIRED, (press.__name__, needs)


def ragged_prompt(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv(2, 4, 2, 24, 8, seed=seed, dtype=torch.float32)


@pytest.mark.parametrize("press", SCORERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_ratio_kept_counts(press: type[ScorerPress], ratio: float) -> None:
    q, k, v = ragged_prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=build(press, compression_ratio=ratio))
    expected = [n - math.floor(n * ratio) for n in LENGTHS.tolist()]
    assert state.data.token_counts().tolist() == [[n, n] for n in expected]


@pytest.mark.parametrize("press", SCORERS, ids=lambda c: c.__name__)
def test_budget_kept_counts(press: type[ScorerPress]) -> None:
    q, k, v = ragged_prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=torch.tensor([24, 5]), press=build(press, budget=7))
    assert state.data.token_counts().tolist() == [[7, 7], [5, 5]]


@pytest.mark.parametrize("press", SCORERS, ids=lambda c: c.__name__)
def test_kept_slots_are_the_prompts(press: type[ScorerPress]) -> None:
    q, k, v = ragged_prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=build(press, compression_ratio=0.5))
    cache = state.data
    for b, n in enumerate(LENGTHS.tolist()):
        for h in range(2):
            pos = cache.positions[b, h]
            real = pos[pos >= 0].long()
            assert len(set(real.tolist())) == len(real) and bool((real < n).all())
            if cache.log_weight is None:  # nothing merged: every slot is the prompt's token, unchanged
                torch.testing.assert_close(cache.keys[b, h][pos >= 0], k[b, h, real])


@pytest.mark.parametrize("press", SCORERS, ids=lambda c: c.__name__)
def test_bad_ratio_and_budget(press: type[ScorerPress]) -> None:
    for ratio in (1.0, -0.1):
        with pytest.raises(AttnzooError, match="compression_ratio"):
            build(press, compression_ratio=ratio)
    with pytest.raises(AttnzooError, match="budget"):
        build(press, budget=0)
    q, k, v = ragged_prompt()
    with pytest.raises(AttnzooError, match="budget"):
        az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=build(press, budget=25))


@pytest.mark.parametrize("press", SCORERS, ids=lambda c: c.__name__)
def test_prefill_then_step_ragged(press: type[ScorerPress]) -> None:
    q, k, v = ragged_prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=build(press, compression_ratio=0.5))
    for t in range(3):
        q1, k1, v1 = qkv(2, 4, 2, 1, 8, seed=10 + t, dtype=torch.float32)
        out, state = az.step(state, q1, k1, v1)
        assert out.shape == (2, 4, 1, 8) and bool(torch.isfinite(out).all())
    assert state.length == 27 and state.data.length.tolist() == [27, 20]
