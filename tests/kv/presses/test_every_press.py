"""Every registered press, built for a budget the way the press benchmark builds it (``for_budget`` with what its
``needs`` ask for): prefill a ragged GQA batch through ``attnzoo.prefill``, decode steps, and the cache stays
finite, holds fewer bytes than the full cache, and the outputs stay finite. A press the benchmark cannot build must
say why here (:data:`NOT_BUILT`)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.bench.suites.presses import build, wrapped
from attnzoo.bench.suites.runner import state_bytes
from attnzoo.kv.presses import presses
from tests.helpers import qkv

NOT_BUILT = {  # press: why the benchmark's builder cannot build it (it has its own tests)
    "ComposedPress": "a list of presses chosen by the user",
    "PerLayerPress": "a press per layer chosen by the user",
    "TemporalMergePress": "needs video frames (tokens_per_frame)",
}
PROMPT, STEPS = 256, 4
LENGTHS = torch.tensor([PROMPT, 201])


def _calibration() -> list[tuple[torch.Tensor, ...]]:
    return [qkv(2, 4, 2, PROMPT, 32, seed=10 + layer, dtype=torch.float32) for layer in range(2)]


def _decode(press, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Prefill ``PROMPT`` tokens (ragged), then ``STEPS`` steps: ``(prefill out, step outs, state)``."""
    out, state = az.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], method="softmax", lengths=LENGTHS,
                            press=press, layer=1)
    steps = []
    for t in range(PROMPT, PROMPT + STEPS):
        step, state = az.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        steps.append(step)
    return out, torch.cat(steps, 2), state


@pytest.mark.parametrize("info", presses(), ids=lambda p: p.name)
def test_every_press_compresses_a_ragged_gqa_batch_and_decodes(info) -> None:
    if info.name in NOT_BUILT:
        with pytest.raises(NotImplementedError):
            build(info, 0.5, _calibration, wrapped(presses()))
        return
    press = build(info, 0.5, _calibration, wrapped(presses()))
    q, k, v = qkv(2, 4, 2, PROMPT + STEPS, 32, seed=0, dtype=torch.float32)
    full_out, _, full = _decode(None, q, k, v)
    out, steps, state = _decode(press, q, k, v)
    torch.testing.assert_close(out, full_out)  # the prompt is attended in full before the press
    assert steps.shape == (2, 4, STEPS, 32) and torch.isfinite(steps).all()
    assert state.length == PROMPT + STEPS
    assert state_bytes(state) < 0.8 * state_bytes(full)  # a budget of one half
