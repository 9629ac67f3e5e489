"""L-family: linear, kernelised and recurrent attention (catalogue IDs L1–L11; each file cites its paper).

Each method has a dense parallel reference, a chunked fast path (:mod:`attnzoo.kernels.linear_scan`) and a recurrent
decoding API (``prefill``/``step`` in its module, see :mod:`attnzoo.methods.linear.common`).
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
    nala,
    nats_hybrid,
    rala,
)
