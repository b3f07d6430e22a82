"""Fusion strategies: how image tokens reach the language model.

Modules: `insertion`, `qformer`, `cross_attention` (`CrossAttention`, `GatedCrossAttention`),
`casa`, `casa_shared` (`CASAShared`: CASA layers with their block's SA weights). See `casa.fusion.base` for the contract. A config picks one by class_path; the
configurations the experiments compare (the strategy matrix) are the YAMLs of
experiments/configs/strategies/, read by `experiments.strategies`.
"""

from casa.fusion.base import FusionStrategy
from casa.fusion.casa import CASA
from casa.fusion.casa_shared import CASAShared
from casa.fusion.cross_attention import CrossAttention, GatedCrossAttention
from casa.fusion.insertion import Insertion
from casa.fusion.qformer import QFormer

__all__ = ["FusionStrategy", "Insertion", "QFormer", "CrossAttention", "GatedCrossAttention", "CASA", "CASAShared"]
