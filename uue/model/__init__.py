"""Towers, pooling and the two-tower model: what turns users and statements into vectors."""

from uue.model.backbone import TextEncoder, load_backbone
from uue.model.inputs import StatementBatch, TowerInput, UserBatch
from uue.model.pooling import AttentionPooling, MeanChunkPooling
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel, load_tower

__all__ = [
    "AttentionPooling", "ItemTower", "MeanChunkPooling", "StatementBatch", "TextEncoder", "TowerInput", "UUEModel",
    "UserBatch", "UserTower", "load_backbone", "load_tower",
]
