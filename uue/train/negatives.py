"""Sampled negatives: extra statements per user that enter the loss as extra columns.

- random:    uniform over the statement pool, excluding the user's known positives;
- hard:      the highest-scoring statements under the current towers, excluding positives;
- semi_hard: statements scoring within `margin` below the user's positive (FaceNet's semi-hard
             window), topped up with the next-hardest below the window, then random, when too few.
- labeled:   the user's known-false statements (label-0 pairs of the training split), random among
             them, topped up at random when the user has too few; they teach the model to rank a
             user's true statements above their false ones across statement families.
Hard and semi-hard read the item-tower vectors of the whole pool, refreshed every `refresh_steps`
steps, so they follow the model as it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from uue.model.inputs import StatementBatch, StatementPool

if TYPE_CHECKING:
    from uue.train.stream import TrainBatch

Strategy = str
STRATEGIES = ("none", "random", "hard", "semi_hard", "labeled")


class NegativeSampler:
    """Picks `num_negatives` statement indices per user and hands their features to the item tower."""

    def __init__(
        self,
        strategy: Strategy,
        num_negatives: int,
        pool: StatementPool,
        margin: float = 0.2,
        refresh_steps: int = 50,
        seed: int = 0,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown negative_sampling {strategy!r}; choose from {STRATEGIES}")
        self.strategy = strategy
        self.num_negatives = 0 if strategy == "none" else num_negatives
        self.pool = pool
        self.pool_size = len(pool)
        if self.num_negatives and self.pool_size <= self.num_negatives:
            raise ValueError(
                f"the statement pool ({self.pool_size}) must be larger than num_negative_samples ({self.num_negatives})"
            )
        self.margin = margin
        self.refresh_steps = refresh_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.pool_vectors: torch.Tensor | None = None
        self.refreshed_at: int | None = None

    @property
    def needs_vectors(self) -> bool:
        return self.strategy in ("hard", "semi_hard") and self.num_negatives > 0

    def needs_refresh(self, step: int) -> bool:
        return self.needs_vectors and (self.refreshed_at is None or step - self.refreshed_at >= self.refresh_steps)

    def refresh(self, encode_pool: Callable[[StatementPool], torch.Tensor], step: int) -> None:
        """Re-encode the pool with the current item tower (`encode_pool`: the pool -> (S, D) vectors)."""
        self.pool_vectors = encode_pool(self.pool)
        self.refreshed_at = step

    def _marked(self, statements: torch.Tensor) -> torch.Tensor:
        """(B, K) statement indices (-1 = padding) -> (B, pool) membership."""
        marked = torch.zeros(len(statements), self.pool_size + 1, dtype=torch.bool)
        index = statements.long().clone()
        index[index < 0] = self.pool_size  # padding lands in a spare column, dropped below
        marked.scatter_(1, index, True)
        return marked[:, : self.pool_size]

    def _random(self, excluded: torch.Tensor, count: int) -> torch.Tensor:
        keys = torch.rand(excluded.shape, generator=self.generator).masked_fill(excluded, -1.0)
        return keys.topk(count, dim=1).indices

    def select(self, user_vectors: torch.Tensor, positives: torch.Tensor,
               positive_scores: torch.Tensor | None = None, known_negatives: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, K) pool indices of negatives for each user; never one of the user's positives.

        `positives` (B, P) are each user's training positives, `known_negatives` (B, N) its label-0
        statements (the `labeled` strategy), as statement indices padded with -1: they travel with the batch.
        """
        excluded = self._marked(positives.cpu())
        free = (~excluded).sum(1)
        if bool((free < self.num_negatives).any()):
            raise ValueError("a user has fewer non-positive statements in the pool than num_negative_samples")
        if self.strategy == "random":
            return self._random(excluded, self.num_negatives)
        if self.strategy == "labeled":
            known = (self._marked(known_negatives.cpu()) if known_negatives is not None
                     else torch.zeros_like(excluded))
            keys = torch.rand(excluded.shape, generator=self.generator) + known.float()  # known ones first
            return keys.masked_fill(excluded, -1.0).topk(self.num_negatives, dim=1).indices
        if self.pool_vectors is None:
            raise RuntimeError(f"{self.strategy} negatives need refresh() with the item tower first")
        scores = user_vectors.detach().float().cpu() @ self.pool_vectors.T
        if self.strategy == "hard":
            return scores.masked_fill(excluded, float("-inf")).topk(self.num_negatives, dim=1).indices
        # semi-hard: rank in-window candidates first (randomly among them), then the hardest below the
        # window, then anything else that is not a positive.
        if positive_scores is None:
            raise ValueError("semi_hard negatives need the users' positive scores")
        pos = positive_scores.detach().float().cpu()[:, None]
        in_window = (scores < pos) & (scores >= pos - self.margin) & ~excluded
        below = (scores < pos - self.margin) & ~excluded
        noise = torch.rand(scores.shape, generator=self.generator)
        priority = torch.where(in_window, 3.0 + noise, torch.where(below, 1.0 + torch.sigmoid(scores), noise))
        return priority.masked_fill(excluded, float("-inf")).topk(self.num_negatives, dim=1).indices

    def sample(self, user_vectors: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, StatementBatch]:
        """Select negatives for the batch's users (its `user_positives`, and for `labeled` its label-0
        `label_statements`) and gather the (B x K) statements, on the users' device.

        Semi-hard windows sit below each user's score for its first positive slot (always a real positive),
        scored on the refreshed pool vectors like the candidates, so the item tower runs once per step, after
        this selection, on positives and negatives together."""
        positive_scores = None
        if self.strategy == "semi_hard" and self.pool_vectors is not None:
            first = batch.statement_index.reshape(user_vectors.size(0), -1)[:, 0].cpu()
            positive_scores = (user_vectors.detach().float().cpu() * self.pool_vectors[first]).sum(-1)
        known = None
        if self.strategy == "labeled":
            known = batch.label_statements.masked_fill(batch.label_values != 0, -1)
        indices = self.select(user_vectors, batch.user_positives, positive_scores, known)
        device = user_vectors.device
        return indices.to(device), self.pool.gather(indices).to(device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pool_vectors": self.pool_vectors,
                "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pool_vectors = state["pool_vectors"]
        self.refreshed_at = state["refreshed_at"]
