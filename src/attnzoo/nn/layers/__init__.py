"""The paper layers' parts around attnzoo's kernels (see :mod:`attnzoo.nn.layers.base`); importing this package
registers every one. :mod:`attnzoo.nn.layers.hedgehog` (Hedgehog's attention distillation of a layer's feature maps)
registers no parts and is imported on its own, as it needs :class:`attnzoo.nn.Attention`."""

from attnzoo.nn.layers import gated_delta, lightning, moh, nala, nats_hybrid, rala, rcmha, sigmoid, titans
from attnzoo.nn.layers.base import LAYERS, GatedRMSNorm, LayerParts, ShortConvolution, register_layer

__all__ = [
    "LAYERS", "GatedRMSNorm", "LayerParts", "ShortConvolution", "gated_delta", "lightning", "moh", "nala",
    "nats_hybrid", "rala", "rcmha", "register_layer", "sigmoid", "titans",
]
