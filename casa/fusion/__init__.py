"""Fusion strategies: how image tokens reach the language model.

YAML names = module names: `insertion`, `qformer`, `cross_attention`
(`CrossAttention`, `GatedCrossAttention`), `casa`. See `casa.fusion.base` for the contract.
"""

from casa.fusion.base import FusionStrategy
from casa.fusion.casa import CASA
from casa.fusion.cross_attention import CrossAttention, GatedCrossAttention
from casa.fusion.insertion import Insertion
from casa.fusion.qformer import QFormer

STRATEGIES = {
    "insertion": Insertion,
    "qformer": QFormer,
    "cross_attention": CrossAttention,
    "gated_cross_attention": GatedCrossAttention,
    "casa": CASA,
}

__all__ = ["FusionStrategy", "Insertion", "QFormer", "CrossAttention", "GatedCrossAttention", "CASA", "STRATEGIES"]
