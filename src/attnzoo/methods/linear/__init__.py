"""L-family: linear, kernelised and recurrent attention (catalogue IDs L1–L12; each file cites its paper).

Each method has a dense parallel reference and a fast path (chunked scans of :mod:`attnzoo.kernels.linear_scan` and
:mod:`attnzoo.kernels.delta_scan` for the causal ones; :mod:`attnzoo.kernels.memory_scan` for titans and titans_mlp).
Every method with a causal pattern (linear, lightning, hedgehog, inline, nala, ecoformer, gated_delta, nats_hybrid,
titans, titans_mlp) also registers a recurrent decoder, so its spec says ``decoding`` and
``attnzoo.prefill``/``attnzoo.step`` run it (its module exposes the same pair on raw states, see
:mod:`attnzoo.methods.linear.common`). agent, rala and l2vit are non-causal only (vision methods) and do not decode.
"""

from attnzoo.methods.linear import (  # noqa: F401
    agent,
    ecoformer,
    gated_delta,
    hedgehog,
    inline,
    l2vit,
    lightning,
    linear,
    miras,
    nala,
    nats_hybrid,
    rala,
    titans,
    titans_mlp,
)
