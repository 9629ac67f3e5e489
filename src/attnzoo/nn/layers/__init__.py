"""The paper layers' parts around attnzoo's kernels (see :mod:`attnzoo.nn.layers.base`); importing this package
registers every one."""

from attnzoo.nn.layers import gated_delta, lightning, sigmoid
from attnzoo.nn.layers.base import LAYERS, GatedRMSNorm, LayerParts, ShortConvolution, register_layer

__all__ = [
    "LAYERS", "GatedRMSNorm", "LayerParts", "ShortConvolution", "gated_delta", "lightning", "register_layer", "sigmoid",
]
