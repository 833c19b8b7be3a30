"""Training examples: (user, positive statement) pairs in seeded, resumable, equally sized batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from uue.data.featurize import Featurizer, collate
from uue.data.readers import UUEDataset
from uue.data.schema import UserData


@dataclass(frozen=True)
class BatchPosition:
    """Where a run is in its data: resuming from here repeats and skips nothing."""

    epoch: int
    batch_in_epoch: int


class PairBatches:
    """Label-1 pairs of one split, shuffled per epoch with `seed + epoch`, batched with drop_last.

    Users and statements are featurized once and cached; `user_index`/`statement_index` (positions in
    `user_ids`/`statement_ids`) travel with each batch so the loss can mask false negatives.
    """

    def __init__(self, dataset: UUEDataset, featurizer: Featurizer, batch_size: int, split: str | None = "train",
                 seed: int = 0, user_features: Callable[[UserData], dict[str, np.ndarray]] | None = None):
        self.dataset = dataset
        # Where a user's features come from: tokens (the featurizer) or cached chunk vectors (uue.chunk_cache).
        self.user_feature_source = user_features or featurizer.user_features
        self.featurizer = featurizer
        self.batch_size = batch_size
        self.split = split
        self.seed = seed
        self.user_ids = sorted(dataset.users)
        self.statement_ids = sorted(dataset.statements)
        self.user_position = {uid: i for i, uid in enumerate(self.user_ids)}
        self.statement_position = {sid: i for i, sid in enumerate(self.statement_ids)}
        self.pairs = np.array(
            [(self.user_position[u], self.statement_position[s]) for u, s in dataset.positive_pairs(split)],
            dtype=np.int64,
        ).reshape(-1, 2)
        if len(self.pairs) < batch_size:
            raise ValueError(
                f"{len(self.pairs)} positive pairs in split {split!r} of {dataset.source}: fewer than one batch "
                f"of {batch_size}"
            )
        self._user_cache: dict[int, dict[str, np.ndarray]] = {}
        self.statement_features = featurizer.statement_features(
            [dataset.statements[s] for s in self.statement_ids]
        )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def users_in_pairs(self) -> list[UserData]:
        return [self.dataset.users[self.user_ids[u]] for u in np.unique(self.pairs[:, 0]).tolist()]

    def labels_by_user(self) -> dict[int, list[tuple[int, int]]]:
        """Every (statement position, 0/1 label) of each user in this split, for the label loss."""
        out: dict[int, list[tuple[int, int]]] = {}
        for lab in self.dataset.labels_in(self.split):
            out.setdefault(self.user_position[lab.user_id], []).append(
                (self.statement_position[lab.statement_id], int(lab.label)))
        return out

    def positives_by_user(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for u, s in self.pairs.tolist():
            out.setdefault(u, set()).add(s)
        return out

    def user_features(self, user: int) -> dict[str, np.ndarray]:
        if user not in self._user_cache:
            self._user_cache[user] = self.user_feature_source(self.dataset.users[self.user_ids[user]])
        return self._user_cache[user]

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.pairs))

    def batch(self, epoch: int, batch_in_epoch: int) -> dict[str, torch.Tensor]:
        order = self.epoch_order(epoch)
        rows = self.pairs[order[batch_in_epoch * self.batch_size : (batch_in_epoch + 1) * self.batch_size]]
        return self.collate_pairs(rows)

    def collate_pairs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        examples = []
        for user, statement in rows.tolist():
            feats = dict(self.user_features(user))
            feats.update({k: v[statement] for k, v in self.statement_features.items()})
            feats["user_index"] = np.int64(user)
            feats["statement_index"] = np.int64(statement)
            examples.append(feats)
        return collate(examples)

    def iterate(
        self, start: BatchPosition = BatchPosition(0, 0)
    ) -> Iterator[tuple[BatchPosition, dict[str, torch.Tensor]]]:
        """Endless stream of (position, batch) from `start`, epoch after epoch."""
        epoch, index = start.epoch, start.batch_in_epoch
        while True:
            while index < self.batches_per_epoch:
                yield BatchPosition(epoch, index), self.batch(epoch, index)
                index += 1
            epoch, index = epoch + 1, 0
