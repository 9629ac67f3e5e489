"""``nn`` layers: projections plus ownership of each method's learnable parts."""

from attnzoo.nn.attention import Attention
from attnzoo.nn.cca import CompressedConvAttention
from attnzoo.nn.key_driven_gqa import KeyDrivenGQA
from attnzoo.nn.layer_router import (
    LayerRouter,
    Route,
    RoutedAttention,
    RouterStep,
    forced_route,
    full_fraction,
    routing_decisions,
    train_routers,
)
from attnzoo.nn.moh import MoHAttention
from attnzoo.nn.seer import SeerAttention
from attnzoo.nn.shvit import SingleHeadAttention

__all__ = [
    "Attention",
    "CompressedConvAttention",
    "KeyDrivenGQA",
    "LayerRouter",
    "MoHAttention",
    "Route",
    "RoutedAttention",
    "RouterStep",
    "SeerAttention",
    "SingleHeadAttention",
    "forced_route",
    "full_fraction",
    "routing_decisions",
    "train_routers",
]
