"""The user-row batch stream: one for one process and for Ray Train workers.

A training row is a user (a preprocessed users-shard row: ragged chunk tokens, positives, labels). Per epoch,
each process reads its rows in order (its Ray Data shard on Ray, the shard files in one process), passes
them through a bounded shuffle buffer seeded by (shuffle_seed, epoch, rank), and cuts them into batches of
`batch_size` users (drop_last, so every worker's batch has the same shape for the gathers). `collate`
turns a batch's rows into tensors, padding at the batch: chunks to the batch's longest chunk, statements to
its longest statement (one function, so packed attention can replace it). Resuming at step N skips the
rows of the first N batches without collating them (no tokens are padded, no vector is computed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uue.config import ModelConfig
from uue.data.featurize import Featurizer, pad_sequences, trim_hidden_columns


def user_key(user_id: str) -> int:
    """A stable 63-bit integer for a user id (seeds its positive draws; identifies it in batch logs)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def draw_positives(positives: Sequence[int], limit: int, seed: int, epoch: int, user_id: str) -> list[int]:
    """Up to `limit` of a user's positives, drawn from (seed, epoch, user): the same on every worker and attempt."""
    positives = list(positives)
    if len(positives) <= limit:
        order = np.random.default_rng([seed, epoch, user_key(user_id)]).permutation(len(positives))
    else:
        order = np.random.default_rng([seed, epoch, user_key(user_id)]).choice(len(positives), limit, replace=False)
    return [int(positives[i]) for i in order]


def shuffled(rows: Iterable[dict[str, Any]], buffer_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A streaming shuffle: hold `buffer_size` rows, emit a random one as each new row arrives."""
    buffer: list[dict[str, Any]] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], row = row, buffer[i]
        yield row
    for i in rng.permutation(len(buffer)).tolist():
        yield buffer[i]


def _pad_ints(rows: Sequence[Sequence[int]], fill: int, dtype=torch.int64) -> torch.Tensor:
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


class StatementTable:
    """The statement table of the shards: token lists (or a frozen backbone's vectors, or hidden states at the
    item tower's cut) and metadata by index."""

    def __init__(self, table: dict[str, Any], featurizer: Featurizer, text_vectors: np.ndarray | None = None):
        self.ids: list[str] = table["statement_id"]
        self.tokens: list[list[int]] = table["tokens"]
        self.metadata: np.ndarray | None = table.get("item_metadata")
        self.text_vectors = text_vectors
        # cache_hidden_states: (S, L, H) hidden states entering the item tower's top blocks, (S, L) their mask
        self.hidden: np.ndarray | None = None
        self.hidden_mask: np.ndarray | None = None
        self.featurizer = featurizer
        tokenizer = featurizer.item_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"

    def __len__(self) -> int:
        return len(self.tokens)

    def features(self, indices: Sequence[int], length: int | None = None) -> dict[str, np.ndarray]:
        """item_* features of these statements, padded to their own longest (or `length`) tokens."""
        if self.text_vectors is not None:
            out = {"item_text_vectors": self.text_vectors[list(indices)]}
        elif self.hidden is not None and self.hidden_mask is not None:
            rows = list(indices)
            hidden, mask = trim_hidden_columns(torch.as_tensor(self.hidden[rows]),
                                               torch.as_tensor(self.hidden_mask[rows]))
            out = {"item_hidden": hidden.numpy(), "item_attention_mask": mask.numpy()}
        else:
            ids, mask = pad_sequences([self.tokens[i] for i in indices], self.pad_id, self.left, length)
            out = {"item_input_ids": ids, "item_attention_mask": mask}
        if self.metadata is not None and self.featurizer.config.use_item_metadata:
            out["item_metadata"] = self.metadata[list(indices)]
        return out

    def pool_features(self) -> dict[str, np.ndarray]:
        """Every statement at one width: the pool sampled negatives and label draws index."""
        if self.hidden is not None and self.hidden_mask is not None:  # the table's own arrays: a copy is large
            out = {"item_hidden": self.hidden, "item_attention_mask": self.hidden_mask}
            if self.metadata is not None and self.featurizer.config.use_item_metadata:
                out["item_metadata"] = self.metadata
            return out
        return self.features(range(len(self)), None)


ChunkVectors = Callable[[Sequence[dict[str, Any]]], list[np.ndarray]]
"""User rows -> each user's (chunks, H) chunk vectors (uue.model.cache.TokenChunkCache)."""
ChunkHidden = Callable[[Sequence[dict[str, Any]]], list[list[np.ndarray]]]
"""User rows -> each user's chunks as (tokens, H) hidden states at the cut (uue.model.cache.TokenHiddenCache)."""


class BatchCollator:
    """A step's user rows -> the model's batch; counts its calls (a resume must not collate skipped batches)."""

    def __init__(self, config: ModelConfig, featurizer: Featurizer, statements: StatementTable, seed: int,
                 chunk_vectors: ChunkVectors | None = None, chunk_hidden: ChunkHidden | None = None):
        self.config = config
        self.statements = statements
        self.seed = seed
        self.chunk_vectors = chunk_vectors
        self.chunk_hidden = chunk_hidden
        tokenizer = featurizer.user_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.calls = 0

    def __call__(self, rows: Sequence[dict[str, Any]], epoch: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        return collate(rows, epoch, self)


def collate(rows: Sequence[dict[str, Any]], epoch: int, c: BatchCollator) -> dict[str, torch.Tensor]:
    """User rows -> tensors: B users (chunks padded to the batch's longest) and B x positives_per_user slots.

    Slot j of user b is `b * P + j`; a user with fewer than P positives repeats its first one in slots that
    `item_valid` marks False (they keep every worker's shapes equal and count nowhere in the loss).
    """
    cfg = c.config
    per_user = cfg.positives_per_user
    statement_index, owner, valid = [], [], []
    for b, row in enumerate(rows):
        drawn = draw_positives(row["positives"], per_user, c.seed, epoch, row["user_id"])
        if not drawn:
            raise ValueError(f"user {row['user_id']!r} has no training positive; it is not a training row")
        for j in range(per_user):
            statement_index.append(drawn[j] if j < len(drawn) else drawn[0])
            owner.append(b)
            valid.append(j < len(drawn))
    batch: dict[str, torch.Tensor] = {
        k: torch.as_tensor(v) for k, v in c.statements.features(statement_index).items()}
    batch["statement_index"] = torch.as_tensor(statement_index, dtype=torch.int64)
    batch["item_owner"] = torch.as_tensor(owner, dtype=torch.int64)
    batch["item_valid"] = torch.as_tensor(valid, dtype=torch.bool)

    counts = [len(r["chunk_tokens"]) for r in rows]
    if min(counts) == 0:  # checked here, on the host: the tower skips the check on a GPU
        raise ValueError(f"user {rows[counts.index(0)]['user_id']!r} has no chunk; preprocessing drops such users")
    chunks = max(counts)
    chunk_mask = torch.zeros(len(rows), chunks, dtype=torch.bool)
    for b, n in enumerate(counts):
        chunk_mask[b, :n] = True
    batch["chunk_mask"] = chunk_mask
    if c.chunk_vectors is not None:
        vectors = c.chunk_vectors(rows)
        out = np.zeros((len(rows), chunks, vectors[0].shape[1]), dtype=np.float32)
        for b, v in enumerate(vectors):
            out[b, : len(v)] = v
        batch["chunk_vectors"] = torch.as_tensor(out)
    elif c.chunk_hidden is not None:
        batch["chunk_hidden"], batch["user_attention_mask"] = _pad_hidden(c.chunk_hidden(rows), chunks, c.left)
    else:
        flat = [t for r in rows for t in r["chunk_tokens"]]
        ids, mask = pad_sequences(flat, c.pad_id, c.left)
        user_ids = np.full((len(rows), chunks, ids.shape[1]), c.pad_id, dtype=np.int64)
        user_mask = np.zeros_like(user_ids)
        start = 0
        for b, n in enumerate(counts):
            user_ids[b, :n], user_mask[b, :n] = ids[start:start + n], mask[start:start + n]
            start += n
        batch["user_input_ids"], batch["user_attention_mask"] = torch.as_tensor(user_ids), torch.as_tensor(user_mask)
    if cfg.use_user_metadata:
        batch["user_metadata"] = torch.as_tensor(np.asarray([r["user_metadata"] for r in rows], dtype=np.float32))
    batch["user_positives"] = _pad_ints([r["positives"] for r in rows], -1)
    batch["label_statements"] = _pad_ints([r["label_statements"] for r in rows], -1)
    batch["label_values"] = _pad_ints([r["label_values"] for r in rows], 0, torch.float32)
    batch["user_key"] = torch.as_tensor([user_key(r["user_id"]) for r in rows], dtype=torch.int64)
    return batch


def _pad_hidden(users: Sequence[Sequence[np.ndarray]], chunks: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's chunks as (tokens, H) hidden states -> (B, chunks, L, H) in their dtype and the (B, chunks, L)
    attention mask, L the batch's longest chunk, padding on the tokenizer's side (as pad_sequences does)."""
    first = users[0][0]
    width = max(len(chunk) for user in users for chunk in user)
    hidden = np.zeros((len(users), chunks, width, first.shape[-1]), dtype=first.dtype)
    mask = np.zeros((len(users), chunks, width), dtype=np.int64)
    for b, user in enumerate(users):
        for j, chunk in enumerate(user):
            columns = slice(width - len(chunk), width) if left else slice(0, len(chunk))
            hidden[b, j, columns], mask[b, j, columns] = chunk, 1
    return torch.as_tensor(hidden), torch.as_tensor(mask)


# ---------------------------------------------------------------------------------- steps
def plan_steps(train_users: int, world_size: int, batch_size: int, num_epochs: int, max_steps: int | None,
               where: str = "the training data") -> tuple[int, int]:
    """(steps per epoch, total steps): each worker streams train_users // world_size users per epoch (Ray Data's
    equal split), cut into batches of batch_size with drop_last."""
    per_epoch = (train_users // world_size) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{train_users} training users (with a positive) in {where}: fewer than one global batch "
                         f"of {world_size * batch_size} ({world_size} workers x model.batch_size {batch_size})")
    return per_epoch, max_steps or num_epochs * per_epoch


@dataclass
class StepRows:
    step: int  # 1-based: the step these rows train
    epoch: int
    rows: list[dict[str, Any]]


class UserStream:
    """Epoch after epoch of one process's user rows, shuffled and batched, from any step on."""

    def __init__(self, epoch_rows: Callable[[int], Iterable[Sequence[dict[str, Any]]]], batch_size: int,
                 steps_per_epoch: int, shuffle_buffer: int, seed: int, rank: int = 0):
        self.epoch_rows = epoch_rows
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank

    def _rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        for block in self.epoch_rows(epoch):
            yield from block

    def steps(self, start_step: int, total_steps: int) -> Iterator[StepRows]:
        """The steps after `start_step`; whole epochs before it are not read at all, the batches of its epoch
        before it are read and dropped (their rows are needed to advance the shuffle, nothing else)."""
        step = start_step
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while step < total_steps:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            rows = shuffled(self._rows(epoch), self.shuffle_buffer, rng)
            batch: list[dict[str, Any]] = []
            index = 0
            for row in rows:
                if index >= self.steps_per_epoch:
                    continue  # drain the epoch (Ray Data's split starts the next one when all workers have)
                batch.append(row)
                if len(batch) < self.batch_size:
                    continue
                if index >= skip and step < total_steps:
                    step += 1
                    yield StepRows(step, epoch, batch)
                batch = []
                index += 1
            if index < self.steps_per_epoch:
                raise RuntimeError(f"rank {self.rank}: epoch {epoch} ran out after {index} of "
                                   f"{self.steps_per_epoch} batches")
            epoch, skip = epoch + 1, 0
