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
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from uue.config import ModelConfig
from uue.data.featurize import Featurizer, pad_sequences
from uue.model.cache import FrozenPrefixCache
from uue.model.inputs import StatementBatch, TowerInput, UserBatch


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


def _pad_states(states: Sequence[np.ndarray], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of N sequences, (tokens, H) each -> (N, L, H) in their dtype and the (N, L) attention mask,
    L the longest, padding on the tokenizer's side (as pad_sequences pads tokens)."""
    width = max(len(s) for s in states)
    hidden = np.zeros((len(states), width, states[0].shape[-1]), dtype=states[0].dtype)
    mask = np.zeros((len(states), width), dtype=np.int64)
    for row, sequence in enumerate(states):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        hidden[row, columns], mask[row, columns] = sequence, 1
    return torch.as_tensor(hidden), torch.as_tensor(mask)


class StatementTable:
    """The shards' statement table: token lists and metadata by index, and, when the item backbone's bottom is
    frozen, what the frozen-prefix cache made of each statement once (its vector, or its hidden states at the
    item tower's cut). `gather` is what the collator and the samplers read."""

    def __init__(self, table: dict[str, Any], featurizer: Featurizer, cache: FrozenPrefixCache | None = None):
        self.ids: list[str] = table["statement_id"]
        self.tokens: list[list[int]] = table["tokens"]
        self.metadata: np.ndarray | None = table.get("item_metadata")
        self.use_metadata = featurizer.config.heads.use_item_metadata
        tokenizer = featurizer.item_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.vectors: np.ndarray | None = None
        self.hidden: list[np.ndarray] | None = None
        self.layer: int | None = None
        self.cache = cache  # held: a shared table lives while someone holds it (what evaluation after training reads)
        if cache is not None:  # the table's order, 64 at a time: how the statement pool has always been encoded
            entries = cache.lookup(self.tokens, by_length=False, micro_batch=64)
            cache.save()
            if cache.keeps_vectors:
                self.vectors = np.stack(entries)
            else:
                self.hidden, self.layer = entries, cache.layer

    def __len__(self) -> int:
        return len(self.tokens)

    def gather(self, indices: Sequence[int] | torch.Tensor) -> StatementBatch:
        """These statements, token columns padded to their own longest."""
        rows = [int(i) for i in (indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else indices)]
        if self.vectors is not None:
            text = TowerInput(vectors=torch.as_tensor(self.vectors[rows]))
        elif self.hidden is not None:
            hidden, mask = _pad_states([self.hidden[i] for i in rows], self.left)
            text = TowerInput(hidden=hidden, attention_mask=mask, layer=self.layer)
        else:
            ids, mask = pad_sequences([self.tokens[i] for i in rows], self.pad_id, self.left)
            text = TowerInput(torch.as_tensor(ids), torch.as_tensor(mask))
        metadata = torch.as_tensor(self.metadata[rows]) if self.metadata is not None and self.use_metadata else None
        return StatementBatch(text, metadata)


@dataclass
class TrainBatch:
    """One step's users (rows of the users shards) and the statements they train against.

    A batch is user-centric: B users, each history encoded once, and M = B x positives_per_user statement slots;
    slot j of user b is `b * P + j`.
    """

    users: UserBatch
    positives: StatementBatch  # the M slots' statements
    statement_index: torch.Tensor  # (M,) each slot's statement (its index in the statement table)
    item_owner: torch.Tensor  # (M,) each slot's user
    item_valid: torch.Tensor  # (M,) False: a repeated slot of a user with fewer than P positives
    user_positives: torch.Tensor  # (B, K) every training positive of each user, -1 padded
    label_statements: torch.Tensor  # (B, K) each user's labelled training statements, -1 padded
    label_values: torch.Tensor  # (B, K) their 0/1 labels
    user_key: torch.Tensor  # (B,) stable integers of the user ids

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return TrainBatch(**moved)

    def backbone_tokens(self) -> tuple[int, int]:
        """(user, item) tokens the two backbones run on for the batch's own chunks and statements (cached
        vectors and hidden states: none); read on the host, before the batch moves to the device."""
        return self.users.chunks.backbone_tokens(), self.positives.text.backbone_tokens()

    def token_counts(self) -> tuple[int, int]:
        """(real tokens, tokens the encoders process, padding included) of the batch's chunks and statements."""
        real = processed = 0
        chunk_mask = self.users.chunks.attention_mask
        if chunk_mask is not None:
            real += int(chunk_mask.sum())
            processed += int(self.users.chunk_mask.sum()) * chunk_mask.shape[-1]
        item_mask = self.positives.text.attention_mask
        if item_mask is not None:
            real += int(item_mask.sum())
            processed += item_mask.numel()
        return real, processed


class BatchCollator:
    """A step's user rows -> the model's batch; counts its calls (a resume must not collate skipped batches).

    `chunk_cache`: the frozen-prefix cache of the user backbone, when its chunks are read as cached vectors
    (cache_chunk_vectors) or hidden states at the user tower's cut (cache_hidden_states)."""

    def __init__(self, config: ModelConfig, featurizer: Featurizer, statements: StatementTable, seed: int,
                 chunk_cache: FrozenPrefixCache | None = None):
        self.config = config
        self.statements = statements
        self.seed = seed
        self.chunk_cache = chunk_cache
        tokenizer = featurizer.user_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.calls = 0

    def __call__(self, rows: Sequence[dict[str, Any]], epoch: int) -> TrainBatch:
        self.calls += 1
        return collate(rows, epoch, self)


def _chunks(rows: Sequence[dict[str, Any]], slots: int, c: BatchCollator) -> TowerInput:
    """The batch users' chunks as (B, slots, ...): tokens padded to the batch's longest chunk, or the cache's
    vectors or hidden states (padded to the longest chunk on the tokenizer's side)."""
    counts = [len(r["chunk_tokens"]) for r in rows]
    place = [b * slots + j for b, n in enumerate(counts) for j in range(n)]

    def in_slots(flat: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros((len(rows) * slots, *flat.shape[1:]))
        out[place] = flat
        return out.view(len(rows), slots, *flat.shape[1:])

    cache = c.chunk_cache
    if cache is None:
        ids, mask = pad_sequences([t for r in rows for t in r["chunk_tokens"]], c.pad_id, c.left)
        return TowerInput(in_slots(torch.as_tensor(ids)).masked_fill(_padding_slots(counts, slots), c.pad_id),
                          in_slots(torch.as_tensor(mask)))
    entries = [entry for user in cache.user_chunks(rows) for entry in user]
    if cache.keeps_vectors:
        return TowerInput(vectors=in_slots(torch.as_tensor(np.stack(entries))))
    hidden, mask = _pad_states(entries, c.left)
    return TowerInput(hidden=in_slots(hidden), attention_mask=in_slots(mask), layer=cache.layer)


def _padding_slots(counts: Sequence[int], slots: int) -> torch.Tensor:
    """(B, slots, 1) True where a user has no chunk (their token ids are padding ids, as the tokenizer pads)."""
    real = torch.arange(slots)[None, :] < torch.as_tensor(counts)[:, None]
    return ~real[:, :, None]


def collate(rows: Sequence[dict[str, Any]], epoch: int, c: BatchCollator) -> TrainBatch:
    """User rows -> tensors: B users (chunks padded to the batch's longest) and B x positives_per_user slots.

    Slot j of user b is `b * P + j`; a user with fewer than P positives repeats its first one in slots that
    `item_valid` marks False (they keep every worker's shapes equal and count nowhere in the loss).
    """
    per_user = c.config.loss.positives_per_user
    statement_index, owner, valid = [], [], []
    for b, row in enumerate(rows):
        drawn = draw_positives(row["positives"], per_user, c.seed, epoch, row["user_id"])
        if not drawn:
            raise ValueError(f"user {row['user_id']!r} has no training positive; it is not a training row")
        for j in range(per_user):
            statement_index.append(drawn[j] if j < len(drawn) else drawn[0])
            owner.append(b)
            valid.append(j < len(drawn))
    counts = [len(r["chunk_tokens"]) for r in rows]
    if min(counts) == 0:  # checked here, on the host: the tower skips the check on a GPU
        raise ValueError(f"user {rows[counts.index(0)]['user_id']!r} has no chunk; preprocessing drops such users")
    slots = max(counts)
    chunk_mask = ~_padding_slots(counts, slots)[:, :, 0]
    metadata = None
    if c.config.heads.use_user_metadata:
        metadata = torch.as_tensor(np.asarray([r["user_metadata"] for r in rows], dtype=np.float32))
    return TrainBatch(
        users=UserBatch(_chunks(rows, slots, c), chunk_mask, metadata),
        positives=c.statements.gather(statement_index),
        statement_index=torch.as_tensor(statement_index, dtype=torch.int64),
        item_owner=torch.as_tensor(owner, dtype=torch.int64),
        item_valid=torch.as_tensor(valid, dtype=torch.bool),
        user_positives=_pad_ints([r["positives"] for r in rows], -1),
        label_statements=_pad_ints([r["label_statements"] for r in rows], -1),
        label_values=_pad_ints([r["label_values"] for r in rows], 0, torch.float32),
        user_key=torch.as_tensor([user_key(r["user_id"]) for r in rows], dtype=torch.int64),
    )


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


@dataclass
class UserStream:
    """Epoch after epoch of one process's user rows, shuffled and batched, from any step on."""

    epoch_rows: Callable[[int], Iterable[Sequence[dict[str, Any]]]]
    """epoch -> that epoch's rows of this process, in blocks (a new call is a new pass)."""
    batch_size: int
    steps_per_epoch: int
    shuffle_buffer: int
    seed: int
    rank: int = 0

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
