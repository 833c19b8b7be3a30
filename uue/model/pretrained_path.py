"""The pretrained path: what the untrained space knows about users, added where a statement is new to the model.

Training teaches the heads the statement families it has labels for; a statement far from all of them (a genre
no label names) is answered by wherever the heads happen to map it, which can rank users worse than the untrained
encoder. The pretrained path adds, for such statements only, the untrained space's ranking of users:

    score(u, x) = [ trained(u) . trained(x) + scale * gate(x) * (content(u) - mean) . e(x) ] / sqrt(1 + gate(x)^2)

- content(u): the user's pooled frozen chunk vectors (`UserTower.content`, the untrained baseline's user vector);
  `mean` is its average over training users, so the term ranks users without moving any statement's offset (how
  often the model thinks a statement is true stays the trained one).
- e(x): the frozen item backbone's unit vector of the statement; gate(x) = sigmoid((novelty(x) - threshold) /
  sharpness) with novelty(x) = 1 - the highest cosine between e(x) and the training statements (`bank`). Training
  statements and their rephrasings stay near 0 and keep the trained score; a new kind of statement gets the path.
- scale: `pretrained_path_weight` x (std of trained scores / std of centred pretrained scores) over training labels,
  so the weight is in units of the trained score's spread.

It stays one dot product: the user vector gains `scale * (content - mean)`, the statement vector `gate * e(x)`,
and the statement vector is renormalised (unit, as before; the user vector is no longer unit). Both backbones must
be frozen (their spaces are the pretrained ones). `uue.train.pretrained_path` fits it on a trained model folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "pretrained_path."


class UserPretrainedPath(nn.Module):
    """The user side: scale * (content - mean of training users' content)."""

    def __init__(self, mean: torch.Tensor, scale: float | torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.mean.numel()

    def forward(self, trained: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """(B, D) trained unit vectors, (B, H) unit content -> (B, D + H)."""
        extra = self.scale * (content.float() - self.mean)
        return torch.cat([trained, extra.to(trained.dtype)], dim=-1)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> UserPretrainedPath:
        return cls(state[PREFIX + "mean"], state[PREFIX + "scale"])


class StatementPretrainedPath(nn.Module):
    """The statement side: the gate of the statement's novelty against the training statements (`bank`)."""

    def __init__(self, bank: torch.Tensor, threshold: float | torch.Tensor, sharpness: float | torch.Tensor):
        super().__init__()
        # float16 on disk and in memory: 20,000 training statements of 384 floats are 15 MB
        self.register_buffer("bank", F.normalize(torch.as_tensor(bank).float(), dim=-1).half())
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("sharpness", torch.as_tensor(sharpness, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.bank.shape[1]

    def gate(self, pretrained: torch.Tensor) -> torch.Tensor:
        """(N, H) unit pretrained statement vectors -> (N,) gate in (0, 1): near 1 for statements far from every
        training statement."""
        nearest = torch.zeros(len(pretrained), device=pretrained.device)
        bank = self.bank.float()  # once per call, not once per slice
        for start in range(0, len(pretrained), 256):  # (256, bank) cosines at a time
            part = pretrained[start : start + 256].float() @ bank.T
            nearest[start : start + 256] = part.max(dim=1).values
        return torch.sigmoid((1.0 - nearest - self.threshold) / self.sharpness)

    def forward(self, trained: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D) trained unit vectors, (N, H) backbone pooled vectors -> (N, D + H) unit vectors."""
        pretrained = F.normalize(pooled.float(), dim=-1)
        gate = self.gate(pretrained)[:, None]
        out = torch.cat([trained.float(), gate * pretrained], dim=-1) / torch.sqrt(1.0 + gate**2)
        return out.to(trained.dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> StatementPretrainedPath:
        return cls(state[PREFIX + "bank"], state[PREFIX + "threshold"], state[PREFIX + "sharpness"])


def has_pretrained_path(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(PREFIX) for key in state)
