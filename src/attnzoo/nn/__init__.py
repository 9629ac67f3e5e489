"""``nn`` layers: projections plus ownership of each method's learnable parts."""

from attnzoo.nn.aaren import Aaren, AarenAttention, AarenBlock
from attnzoo.nn.attention import Attention
from attnzoo.nn.cca import CompressedConvAttention
from attnzoo.nn.gaam import GaussianAdaptiveAttention
from attnzoo.nn.key_driven_gqa import KeyDrivenGQA
from attnzoo.nn.lama import LAMAPooling
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
from attnzoo.nn.probe import AttentiveProbe
from attnzoo.nn.seer import SeerAttention
from attnzoo.nn.shvit import SingleHeadAttention
from attnzoo.nn.slot import SlotAttention
from attnzoo.nn.titans_mac import TitansMAC
from attnzoo.nn.titans_mag import TitansMAG
from attnzoo.nn.titans_mal import TitansMAL

__all__ = [
    "Aaren",
    "AarenAttention",
    "AarenBlock",
    "Attention",
    "AttentiveProbe",
    "CompressedConvAttention",
    "GaussianAdaptiveAttention",
    "KeyDrivenGQA",
    "LAMAPooling",
    "LayerRouter",
    "MoHAttention",
    "Route",
    "RoutedAttention",
    "RouterStep",
    "SeerAttention",
    "SingleHeadAttention",
    "SlotAttention",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "forced_route",
    "full_fraction",
    "routing_decisions",
    "train_routers",
]
