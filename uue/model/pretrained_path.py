"""The pretrained path: what the untrained space knows about users, added where a statement is new to the model.

Training teaches the heads the statement families it has labels for; a statement far from all of them (a genre
no label names) is answered by wherever the heads happen to map it, which can rank users worse than the untrained
encoder. The pretrained path adds, for such statements only, the untrained space's ranking of users:

    score(u, x) = [ share(x) * trained(u) . trained(x)
                    + scale * gate(x) * (content(u) - mean + trained(u) @ content_map) . e(x)
                    - offset_gate(x) * trained_mean . trained(x) ] / norm(x)

- content(u): the user's pooled frozen chunk vectors, their mean (`UserTower.content`, the untrained baseline's user
  vector) or, with user_pooling "affinity", a mean weighted by the trained model's view of which chunks fit the
  user (`UserPretrainedPath`); `mean` is its average over training users, so the term ranks users without moving
  any statement's offset. With `predicted_content_weight` p > 0 it gains trained(u) @ content_map: p times the
  centred content the trained user vector predicts (a ridge map fitted on the training users; no map when p = 0).
  The pooled content counts every line of a history alike; the prediction reads the user as the trained model
  does (which films they rated highly, not only which they rated) and says it in the pretrained space, where a
  new statement can be read.
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
- share(x) = 1 - (1 - trained_share) * gate(x): how much of the trained ranking a new statement keeps. The heads
  rank users on a genre no label names by the trained genres it lands near (MovieLens-1M: Sci-Fi inherits the fans
  of dramas), so a new statement may weigh the pretrained ranking against part of it (`novel_trained_share`, 1
  unless set); statements near the trained ones keep all of it. norm(x) is the norm at share 1, so a statement's
  scale does not change with it.

- Users unlike every training user (`fallback_threshold`): a history that is not what the model was trained on
  (everyday posts for a model trained on movie ratings) is read by movie-trained heads as noise, and so is every
  statement it is asked about, a movie statement near the trained ones included. The user's novelty is 1 - the
  cosine between their plain mean content and the training users' mean content (MovieLens-1M training users at
  most 0.16, MovieLens-100K's 0.13; the sample data's everyday posts 0.62-0.93); its gate g(u), the same sigmoid,
  blends the user from the score above to the untrained baseline's score, scale * mean_content(u) . e(x):

    score(u, x) = (1 - g(u)) * [the score above] + g(u) * scale * mean_content(u) . e(x)

  so a user far from all training users is scored exactly as the untrained encoder scores them, and a training-like
  user exactly as before.

It stays one dot product: the user vector gains `scale * (content - mean + trained @ content_map)` and a constant
1, the statement vector `gate * e(x)` and `-offset_gate * trained_mean . trained(x)` and its trained part is
multiplied by share(x); the statement vector is divided by norm(x) (unit at share 1; the user vector is no longer
unit). With the fallback the user vector is (1 - g(u)) times that, followed by g(u) * scale * mean_content(u), and
the statement vector is followed by e(x) (not divided by norm(x)). Both backbones must be frozen (their spaces are
the pretrained ones). `uue.train.pretrained_path` fits it on a trained model folder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "pretrained_path."


class UserPretrainedPath(nn.Module):
    """The user side: scale * (content - mean of training users' content [+ trained @ content_map]), and a constant
    1 (the statement side's offset correction).

    content pools the user's frozen chunk vectors: their plain mean (the untrained baseline's user vector), or with
    `chunk_map` (user_pooling "affinity") a mean weighted by how well each chunk, read as a statement by the trained
    item head, fits the user's trained vector: softmax over the user's chunks of that score's z-score. The trained
    model picks the lines of the history that say most about the user (on MovieLens, the films a user rated highly
    among those of a genre), and the pretrained space reads what they are about, a kind of statement the heads were
    never trained on included.

    `content_map` (D, H), when fitted (`predicted_content_weight` > 0), maps the trained user vector to the centred
    content it predicts, the weight folded in; its product is added to the centred content.

    `fallback_threshold` (with `fallback_sharpness`), when fitted: users whose plain mean content is far from the
    training users' mean are blended to the untrained baseline (the module docstring), one more block of width H.
    `baseline_mean` is the training users' plain mean content the novelty compares with; None: `mean`, which is that
    mean when the path pools the plain mean (with "affinity" `mean` averages the weighted pools)."""

    def __init__(self, mean: torch.Tensor, scale: float | torch.Tensor, chunk_map: torch.Tensor | None = None,
                 chunk_bias: torch.Tensor | None = None, content_map: torch.Tensor | None = None,
                 fallback_threshold: float | torch.Tensor | None = None,
                 fallback_sharpness: float | torch.Tensor | None = None,
                 baseline_mean: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1))
        if (chunk_map is None) != (chunk_bias is None):
            raise ValueError("chunk_map and chunk_bias come together (the item head as a linear map)")
        # (H, D) and (D,): the trained item head on a backbone vector, as the linear map it is (`item_head_as_map`)
        self.chunk_map = None if chunk_map is None else nn.Buffer(torch.as_tensor(chunk_map, dtype=torch.float32))
        self.chunk_bias = None if chunk_bias is None else nn.Buffer(torch.as_tensor(chunk_bias, dtype=torch.float32))
        # (D, H): trained user vector -> the centred content it predicts, x predicted_content_weight
        self.content_map = None if content_map is None else nn.Buffer(torch.as_tensor(content_map,
                                                                                     dtype=torch.float32))
        if (fallback_threshold is None) != (fallback_sharpness is None):
            raise ValueError("fallback_threshold and fallback_sharpness come together (the user gate's sigmoid)")
        self.fallback_threshold = None if fallback_threshold is None else nn.Buffer(
            torch.as_tensor(fallback_threshold, dtype=torch.float32).reshape(1))
        self.fallback_sharpness = None if fallback_sharpness is None else nn.Buffer(
            torch.as_tensor(fallback_sharpness, dtype=torch.float32).reshape(1))
        if baseline_mean is not None and fallback_threshold is None:
            raise ValueError("baseline_mean is what the fallback's user novelty compares with: it needs "
                             "fallback_threshold")
        self.baseline_mean = None if baseline_mean is None else nn.Buffer(
            torch.as_tensor(baseline_mean, dtype=torch.float32).reshape(-1))

    @property
    def has_fallback(self) -> bool:
        return self.fallback_threshold is not None

    @property
    def width(self) -> int:
        return self.mean.numel() + 1 + (self.mean.numel() if self.has_fallback else 0)

    def user_novelty(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H) frozen chunk vectors, (B, C) mask -> (B,) 1 - cosine of the plain mean content to the training
        users' mean content."""
        return self._novelty(self._mean_content(chunk_vectors, chunk_mask))

    def _novelty(self, mean_content: torch.Tensor) -> torch.Tensor:
        reference = self.mean if self.baseline_mean is None else self.baseline_mean
        return 1.0 - mean_content @ F.normalize(reference, dim=0)

    @staticmethod
    def _mean_content(chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """The untrained baseline's user vector: the unit mean of the real chunks' frozen vectors."""
        mask = chunk_mask.float()[..., None]
        pooled = (chunk_vectors.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def content(self, trained: torch.Tensor, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, D) trained unit vectors, (B, C, H) frozen chunk vectors, (B, C) mask -> (B, H) unit content."""
        if self.chunk_map is None:
            return self._mean_content(chunk_vectors, chunk_mask)
        vectors, mask = chunk_vectors.float(), chunk_mask.bool()
        as_statements = F.normalize(vectors @ self.chunk_map + self.chunk_bias, dim=-1)
        fit = (as_statements * trained.float()[:, None, :]).sum(-1)  # (B, C) cosines
        count = mask.sum(1, keepdim=True).clamp(min=1)
        centred = (fit - (fit * mask).sum(1, keepdim=True) / count) * mask
        spread = ((centred**2).sum(1, keepdim=True) / count).sqrt()
        weights = torch.softmax((centred / spread.clamp(min=1e-6)).masked_fill(~mask, float("-inf")), dim=1)
        pooled = (vectors * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-12)
        return F.normalize(pooled, dim=-1)

    def forward(self, trained: torch.Tensor, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, D) trained unit vectors, (B, C, H) frozen chunk vectors, (B, C) mask -> (B, D + H + 1)."""
        mean_content = self._mean_content(chunk_vectors, chunk_mask)  # the baseline's user: pooled once, used thrice
        content = mean_content if self.chunk_map is None else self.content(trained, chunk_vectors, chunk_mask)
        centred = content - self.mean
        if self.content_map is not None:
            centred = centred + trained.float() @ self.content_map
        extra = self.scale * centred
        one = torch.ones_like(extra[:, :1])
        out = torch.cat([trained.float(), extra, one], dim=-1)
        if self.has_fallback:
            novelty = self._novelty(mean_content)
            far = torch.sigmoid((novelty - self.fallback_threshold) / self.fallback_sharpness)[:, None]
            baseline = self.scale * mean_content
            out = torch.cat([(1.0 - far) * out, far * baseline], dim=-1)
        return out.to(trained.dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> UserPretrainedPath:
        return cls(state[PREFIX + "mean"], state[PREFIX + "scale"], state.get(PREFIX + "chunk_map"),
                   state.get(PREFIX + "chunk_bias"), state.get(PREFIX + "content_map"),
                   state.get(PREFIX + "fallback_threshold"), state.get(PREFIX + "fallback_sharpness"),
                   state.get(PREFIX + "baseline_mean"))


def item_head_as_map(projection: nn.Module, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The item tower's projection as (H, D) map and (D,) bias, checked to be linear (an affine head: a Linear, or
    the identity plus an affine low-rank correction); a head with an activation has no such map."""
    weight = next(projection.parameters())
    with torch.no_grad():
        bias = projection(weight.new_zeros(1, hidden)).reshape(-1).float()
        chunk_map = projection(torch.eye(hidden, device=weight.device, dtype=weight.dtype)).float() - bias
        probe = torch.randn(8, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device)
        if not torch.allclose(projection(probe.to(weight.dtype)).float(), probe @ chunk_map + bias, atol=1e-3):
            raise ValueError("user_pooling 'affinity' reads chunks with the item head as a linear map; this item head "
                             "is not linear (use user_pooling 'mean')")
    return chunk_map.cpu(), bias.cpu()


class StatementPretrainedPath(nn.Module):
    """The statement side: the gates of the statement's novelty against the training statements (`bank`), the
    training users' mean trained vector (`trained_mean`) whose dot product with the statement is its offset, and
    the share of the trained ranking a new statement keeps (`trained_share`)."""

    def __init__(self, bank: torch.Tensor, trained_mean: torch.Tensor, threshold: float | torch.Tensor,
                 offset_threshold: float | torch.Tensor, sharpness: float | torch.Tensor,
                 trained_share: float | torch.Tensor = 1.0, fallback: bool = False):
        super().__init__()
        # float16 on disk and in memory: 20,000 training statements of 384 floats are 15 MB
        self.register_buffer("bank", F.normalize(torch.as_tensor(bank).float(), dim=-1).half())
        self.register_buffer("trained_mean", torch.as_tensor(trained_mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("offset_threshold", torch.as_tensor(offset_threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("sharpness", torch.as_tensor(sharpness, dtype=torch.float32).reshape(1))
        self.register_buffer("trained_share", torch.as_tensor(trained_share, dtype=torch.float32).reshape(1))
        # e(x) after the scaled parts, for the user side's fallback to the untrained baseline (a flag on disk)
        self.fallback = nn.Buffer(torch.ones(1)) if fallback else None

    @property
    def width(self) -> int:
        return self.bank.shape[1] + 1 + (self.bank.shape[1] if self.fallback is not None else 0)

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
        """(N, D) trained unit vectors, (N, H) backbone pooled vectors -> (N, D + H + 1) vectors (unit at share 1)."""
        pretrained = F.normalize(pooled.float(), dim=-1)
        novelty = self.novelty(pretrained)
        gate = torch.sigmoid((novelty - self.threshold) / self.sharpness)[:, None]
        offset_gate = torch.sigmoid((novelty - self.offset_threshold) / self.sharpness)[:, None]
        parts = [trained.float(), gate * pretrained, -offset_gate * (trained.float() @ self.trained_mean[:, None])]
        # divided by the norm at share 1, so a statement's scale does not change with its share
        norm = torch.cat(parts, dim=-1).norm(dim=-1, keepdim=True).clamp(min=1e-12)
        parts[0] = parts[0] * (1.0 - (1.0 - self.trained_share) * gate)
        out = torch.cat(parts, dim=-1) / norm
        if self.fallback is not None:
            out = torch.cat([out, pretrained], dim=-1)
        return out.to(trained.dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> StatementPretrainedPath:
        keys = ("bank", "trained_mean", "threshold", "offset_threshold", "sharpness")
        missing = [PREFIX + key for key in keys if PREFIX + key not in state]
        if missing:
            raise ValueError(f"the saved pretrained path lacks {missing} (fitted before the offset gate): refit it "
                             "with uue.train.pretrained_path.fit_pretrained_path")
        # A path saved before trained_share existed kept the whole trained ranking.
        return cls(*(state[PREFIX + key] for key in keys), state.get(PREFIX + "trained_share", 1.0),
                   fallback=PREFIX + "fallback" in state)


def has_pretrained_path(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(PREFIX) for key in state)


def saved_width(head: Any) -> int:
    """The width a fitted path adds to a saved tower's vectors (0 without one), from its open head.safetensors
    (`safe_open`) without loading the tensors: the backbone width (content or e(x)) and the offset column, and the
    backbone width once more with the fallback to the untrained baseline."""
    keys = set(head.keys())
    for key in (PREFIX + "mean", PREFIX + "bank"):
        if key in keys:
            hidden = head.get_slice(key).get_shape()[-1]
            fallback = {PREFIX + "fallback_threshold", PREFIX + "fallback"} & keys
            return hidden + 1 + (hidden if fallback else 0)
    return 0
