"""Towers, pooling and the two-tower model."""

from uue.model.backbone import PRESETS, ModelNotAvailableError, TextEncoder, load_backbone
from uue.model.pooling import AttentionPooling, MeanChunkPooling, WeightedMeanPooling
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel, UUEOutput, load_tower

__all__ = [
    "PRESETS", "AttentionPooling", "ItemTower", "MeanChunkPooling", "ModelNotAvailableError", "TextEncoder",
    "UUEModel", "UUEOutput", "UserTower", "WeightedMeanPooling", "load_backbone", "load_tower",
]
