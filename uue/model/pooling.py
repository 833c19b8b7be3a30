"""Pooling of a user's chunk vectors into one vector, under a chunk mask (padding chunks get no weight)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionPooling(nn.Module):
    """Multi-head attention from one learned query over the chunk vectors.

    Lets the model weight informative chunks (a review that reveals a taste) above filler, unlike a mean.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:  # the heads split the chunk vectors into equal slices
            raise ValueError(f"attention_heads={num_heads} must divide the backbone hidden size {hidden_size}")
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H) vectors, (B, C) bool mask of real chunks -> (B, H)."""
        query = self.query.expand(chunk_vectors.size(0), -1, -1).to(chunk_vectors.dtype)
        pooled, _ = self.attention(
            query, chunk_vectors, chunk_vectors, key_padding_mask=~chunk_mask.bool(), need_weights=False
        )
        return self.norm(pooled.squeeze(1))


class MeanChunkPooling(nn.Module):
    """Masked mean of the chunk vectors (use_attention_pooling=False)."""

    def forward(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        mask = chunk_mask.to(chunk_vectors.dtype).unsqueeze(-1)
        return (chunk_vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)
