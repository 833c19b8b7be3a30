"""The pretrained path: what the untrained space knows about users, added where a statement is new to the model.

Training teaches the heads the statement families it has labels for; a statement far from all of them (a genre
no label names) is answered by wherever the heads happen to map it, which can rank users worse than the untrained
encoder. The pretrained path adds, for such statements only, the untrained space's ranking of users:

    score(u, x) = [ trained(u) . trained(x) + scale * gate(x) * (content(u) - mean) . e(x)
                    - offset_gate(x) * trained_mean . trained(x) ] / norm(x)

- content(u): the user's pooled frozen chunk vectors (`UserTower.content`, the untrained baseline's user vector);
  `mean` is its average over training users, so the term ranks users without moving any statement's offset.
- e(x): the frozen item backbone's unit vector of the statement; gate(x) = sigmoid((novelty(x) - threshold) /
  sharpness) with novelty(x) = 1 - the highest cosine between e(x) and the training statements (`bank`). Training
  statements and their rephrasings stay near 0 and keep the trained score; a new kind of statement gets the path.
- scale: `pretrained_path_weight` x (std of trained scores / std of centred pretrained scores) over training labels,
  so the weight is in units of the trained score's spread.
- The offset (how often the model thinks a statement is true: its mean score over training users, trained_mean .
  trained(x), trained_mean the training users' mean trained vector) is kept while a statement is near the trained
  ones, whose offsets carry over, and dropped (offset_gate, the same sigmoid at `offset_threshold`) for a statement
  far from all of them, whose trained offset is wherever the heads happened to map it (MovieLens-1M with gender
  held out: "is a man or boy" below "is a woman or girl" for nearly everyone). Its mean score is then zero: the
  model ranks users on it without claiming to know how common it is.

It stays one dot product: the user vector gains `scale * (content - mean)` and a constant 1, the statement vector
`gate * e(x)` and `-offset_gate * trained_mean . trained(x)`, and the statement vector is renormalised (unit, as
before; the user vector is no longer unit). Both backbones must be frozen (their spaces are the pretrained ones).
`uue.train.pretrained_path` fits it on a trained model folder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "pretrained_path."


class UserPretrainedPath(nn.Module):
    """The user side: scale * (content - mean of training users' content), and a constant 1 (the statement side's
    offset correction)."""

    def __init__(self, mean: torch.Tensor, scale: float | torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.mean.numel() + 1

    def forward(self, trained: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """(B, D) trained unit vectors, (B, H) unit content -> (B, D + H + 1)."""
        extra = self.scale * (content.float() - self.mean)
        one = torch.ones_like(extra[:, :1])
        return torch.cat([trained, extra.to(trained.dtype), one.to(trained.dtype)], dim=-1)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> UserPretrainedPath:
        return cls(state[PREFIX + "mean"], state[PREFIX + "scale"])


class StatementPretrainedPath(nn.Module):
    """The statement side: the gates of the statement's novelty against the training statements (`bank`), and the
    training users' mean trained vector (`trained_mean`) whose dot product with the statement is its offset."""

    def __init__(self, bank: torch.Tensor, trained_mean: torch.Tensor, threshold: float | torch.Tensor,
                 offset_threshold: float | torch.Tensor, sharpness: float | torch.Tensor):
        super().__init__()
        # float16 on disk and in memory: 20,000 training statements of 384 floats are 15 MB
        self.register_buffer("bank", F.normalize(torch.as_tensor(bank).float(), dim=-1).half())
        self.register_buffer("trained_mean", torch.as_tensor(trained_mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("offset_threshold", torch.as_tensor(offset_threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("sharpness", torch.as_tensor(sharpness, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.bank.shape[1] + 1

    def novelty(self, pretrained: torch.Tensor) -> torch.Tensor:
        """(N, H) unit pretrained statement vectors -> (N,) 1 - the highest cosine to a training statement."""
        nearest = torch.zeros(len(pretrained), device=pretrained.device)
        bank = self.bank.float()  # once per call, not once per slice
        for start in range(0, len(pretrained), 256):  # (256, bank) cosines at a time
            part = pretrained[start : start + 256].float() @ bank.T
            nearest[start : start + 256] = part.max(dim=1).values
        return 1.0 - nearest

    def gate(self, pretrained: torch.Tensor) -> torch.Tensor:
        """(N, H) unit pretrained statement vectors -> (N,) gate in (0, 1): near 1 for statements far from every
        training statement."""
        return torch.sigmoid((self.novelty(pretrained) - self.threshold) / self.sharpness)

    def forward(self, trained: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D) trained unit vectors, (N, H) backbone pooled vectors -> (N, D + H + 1) unit vectors."""
        pretrained = F.normalize(pooled.float(), dim=-1)
        novelty = self.novelty(pretrained)
        gate = torch.sigmoid((novelty - self.threshold) / self.sharpness)[:, None]
        offset_gate = torch.sigmoid((novelty - self.offset_threshold) / self.sharpness)[:, None]
        offset = trained.float() @ self.trained_mean[:, None]
        out = torch.cat([trained.float(), gate * pretrained, -offset_gate * offset], dim=-1)
        return F.normalize(out, dim=-1).to(trained.dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> StatementPretrainedPath:
        keys = ("bank", "trained_mean", "threshold", "offset_threshold", "sharpness")
        missing = [PREFIX + key for key in keys if PREFIX + key not in state]
        if missing:
            raise ValueError(f"the saved pretrained path lacks {missing} (fitted before the offset gate): refit it "
                             "with uue.train.pretrained_path.fit_pretrained_path")
        return cls(*(state[PREFIX + key] for key in keys))


def has_pretrained_path(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(PREFIX) for key in state)


def saved_width(head: Any) -> int:
    """The width a fitted path adds to a saved tower's vectors (0 without one), from its open head.safetensors
    (`safe_open`) without loading the tensors: the backbone width (content or e(x)) and the offset column."""
    for key in (PREFIX + "mean", PREFIX + "bank"):
        if key in head.keys():
            return head.get_slice(key).get_shape()[-1] + 1
    return 0
