"""Pooling of a user's chunk vectors into one vector, under a chunk mask (padding chunks get no weight)."""

from __future__ import annotations

import torch
from torch import nn


def _check_heads(hidden_size: int, num_heads: int) -> None:
    """Both attention poolings split the chunk vectors into num_heads equal slices."""
    if hidden_size % num_heads:
        raise ValueError(f"attention_heads={num_heads} must divide the backbone hidden size {hidden_size}")


class AttentionPooling(nn.Module):
    """Multi-head attention from one learned query over the chunk vectors.

    Lets the model weight informative chunks (a review that reveals a taste) above filler, unlike a mean.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        _check_heads(hidden_size, num_heads)
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


class WeightedMeanPooling(nn.Module):
    """Softmax-weighted mean of the chunk vectors themselves (attention_pooling_kind="weighted_mean").

    Head h scores each chunk by a learned query against the h-th slice of its vector, as multi-head attention
    splits its keys, and the heads' weights are averaged. The queries start at zero, so it starts as the plain
    mean; the slices give each head its own gradient, so the heads do not stay copies of each other. The pooled
    vector is always a convex combination of chunk vectors: unlike AttentionPooling, no random projection moves it
    out of the backbone's space. What it learns is which chunks count.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        _check_heads(hidden_size, num_heads)
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.zeros(num_heads, hidden_size // num_heads))

    def forward(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H) vectors, (B, C) bool mask of real chunks -> (B, H)."""
        batch, chunks, hidden = chunk_vectors.shape
        keys = chunk_vectors.view(batch, chunks, self.num_heads, hidden // self.num_heads)
        scores = torch.einsum("bcqd,qd->bqc", keys, self.queries.to(chunk_vectors.dtype))
        scores = scores.masked_fill(~chunk_mask.bool().unsqueeze(1), float("-inf"))
        weights = scores.softmax(dim=-1).mean(dim=1)
        return torch.einsum("bc,bch->bh", weights, chunk_vectors)


class MeanChunkPooling(nn.Module):
    """Masked mean of the chunk vectors (use_attention_pooling=False)."""

    def forward(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        mask = chunk_mask.to(chunk_vectors.dtype).unsqueeze(-1)
        return (chunk_vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)
