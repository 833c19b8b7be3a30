"""Towers, pooling and the two-tower model."""

from uue.model.backbone import TextEncoder, load_backbone
from uue.model.pooling import AttentionPooling, MeanChunkPooling
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel, UUEOutput, load_tower

__all__ = [
    "AttentionPooling", "ItemTower", "MeanChunkPooling", "TextEncoder",
    "UUEModel", "UUEOutput", "UserTower", "load_backbone", "load_tower",
]
