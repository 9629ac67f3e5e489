"""D-family: dynamic, content-dependent sparsity (catalogue IDs D1–D12; each file cites its paper). Every method is a
selection rule (:mod:`attnzoo.kernels.selection`) and the shared attend kernel
(:func:`attnzoo.kernels.block_sparse.selected_attention`), itself the method ``block_sparse``."""

from attnzoo.methods.sparse import (  # noqa: F401
    adaspa,
    biformer,
    block_sparse,
    dhsa,
    hip,
    hyper,
    landmark,
    moba,
    pbs,
    rectified_sparse,
    routing,
    seer,
    token_topk,
)
