"""NAtS-L's layer (L11, :mod:`attnzoo.methods.linear.nats_hybrid`): Gated DeltaNet's parts around the hybrid kernel.

Paper: "Neural Attention Search Linear: Towards Adaptive Token-Level Hybrid Attention Models" (Deng, Winje, Fehring,
Lindauer, arXiv:2602.03681), read with the authors' public code (automl/NeuralAttentionSearchLinear, the GDN variant),
whose linear branch is a Gated DeltaNet layer. So the layer built for ``method="nats_hybrid"`` is
:class:`~attnzoo.nn.layers.gated_delta.GatedDeltaNetParts`: short convolutions on q/k/v, data-dependent ``β_t`` and
decay ``g_t`` (these feed the kernel's delta-rule branch; a token routed to the softmax cache writes nothing there,
``β' = β(1 − f)``, while the decay still applies), and the gated RMSNorm on the output.

The router is the kernel's own learnable scorer on the (convolved) keys, ``scorer_weight``/``scorer_bias``, owned by
``attnzoo.nn.Attention`` and trained by the kernel's straight-through estimator.

Not built (recorded): the paper routes 64-token blocks by a scorer on mean-pooled hidden states and mixes the softmax
and delta-rule outputs with learned per-token weights after separate norms; the kernel here routes per token on the
keys and returns the sum of the two branches, so the layer can norm and gate only that sum.
"""

from __future__ import annotations

from attnzoo.nn.layers.base import register_layer
from attnzoo.nn.layers.gated_delta import GatedDeltaNetParts

register_layer("nats_hybrid", GatedDeltaNetParts)
