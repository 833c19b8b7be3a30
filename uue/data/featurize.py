"""Records -> fixed-shape numpy features, and batches of them -> tensors.

Fixed shapes (chunks padded to num_chunks_per_user, tokens to max length) let Ray Data ship features as
tensor columns and let every worker build equally shaped batches; `trim_batch` then cuts the padding
columns a batch does not use, so the model never encodes padding it need not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from uue.config import ModelConfig
from uue.data.schema import Statement, UserChunk, UserData


def hash_metadata(metadata: dict[str, Any] | None, dim: int) -> np.ndarray:
    """Feature-hash a metadata object into a `dim` vector (stable across processes and runs).

    Strings and booleans become a one-hot bucket for "key=value"; numbers add log1p-scaled magnitude to
    the bucket of "key"; lists hash each element. Unknown keys need no vocabulary, which is why hashing.
    """
    vec = np.zeros(dim, dtype=np.float32)
    if not metadata:
        return vec

    def bucket(token: str) -> tuple[int, float]:
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % dim, 1.0 if (value >> 63) & 1 else -1.0

    def add(key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or isinstance(value, str):
            idx, sign = bucket(f"{key}={value}")
            vec[idx] += sign
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                idx, sign = bucket(key)
                vec[idx] += sign * math.copysign(math.log1p(abs(value)), value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(key, item)
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                add(f"{key}.{sub_key}", sub_value)

    for key, value in sorted(metadata.items()):
        add(str(key), value)
    return vec


def _timestamp_key(chunk: UserChunk) -> float:
    if chunk.timestamp is None:
        return float("-inf")
    try:
        return datetime.fromisoformat(chunk.timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def select_chunk_indices(chunks: Sequence[UserChunk], limit: int) -> list[int]:
    """Positions of the `limit` most recent chunks, in order (by timestamp; position breaks ties, untimed
    chunks count as oldest). Anything with a `.timestamp` works: the user store evicts with this too."""
    if len(chunks) <= limit:
        return list(range(len(chunks)))
    order = sorted(range(len(chunks)), key=lambda i: (_timestamp_key(chunks[i]), i))
    return sorted(order[-limit:])


def select_chunks(chunks: Sequence[UserChunk], limit: int) -> list[UserChunk]:
    """Keep the `limit` most recent chunks (by timestamp; file order breaks ties and untimed chunks)."""
    return [chunks[i] for i in select_chunk_indices(chunks, limit)]


def chunk_text(chunk: UserChunk) -> str:
    return f"[{chunk.platform}] {chunk.text}" if chunk.platform else chunk.text


def _checked_statements(statements: Sequence[Statement | str]) -> list[Statement]:
    """Plain strings as Statements; an empty text is refused before any tokenizer sees it."""
    items = [s if isinstance(s, Statement) else Statement(statement_id="", text=s) for s in statements]
    for s in items:
        if not s.text or not s.text.strip():
            raise ValueError(f"statement {s.statement_id!r} has empty text")
    return items


class Featurizer:
    """Tokenizes users and statements into fixed-shape arrays for one model config."""

    def __init__(self, config: ModelConfig, user_tokenizer: PreTrainedTokenizerBase,
                 item_tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.user_tokenizer = user_tokenizer
        self.item_tokenizer = item_tokenizer

    @property
    def item_length(self) -> int:
        return self.config.towers.max_statement_length + self.config.towers.max_context_length

    def user_features(
        self, user: UserData | Sequence[UserChunk], metadata: dict | None = None
    ) -> dict[str, np.ndarray]:
        if isinstance(user, UserData):
            chunks, metadata = user.chunks, user.metadata
        else:
            chunks = list(user)
        if not chunks:
            raise ValueError("a user needs at least one chunk of text")
        cfg = self.config
        kept = select_chunks(chunks, cfg.towers.num_chunks_per_user)
        chunk_ids, chunk_mask_tokens = self.chunk_tokens(kept)
        ids = np.zeros((cfg.towers.num_chunks_per_user, cfg.towers.max_chunk_length), dtype=np.int64)
        mask = np.zeros_like(ids)
        pad_id = self.user_tokenizer.pad_token_id or 0
        ids[:] = pad_id
        ids[: len(kept)] = chunk_ids
        mask[: len(kept)] = chunk_mask_tokens
        chunk_mask = np.zeros(cfg.towers.num_chunks_per_user, dtype=bool)
        chunk_mask[: len(kept)] = True
        features = {"user_input_ids": ids, "user_attention_mask": mask, "chunk_mask": chunk_mask}
        if cfg.heads.use_user_metadata:
            features["user_metadata"] = hash_metadata(metadata, cfg.heads.metadata_dim)
        return features

    def chunk_tokens(self, chunks: Sequence[UserChunk]) -> tuple[np.ndarray, np.ndarray]:
        """Chunks -> (N, max_chunk_length) token ids and attention mask: the one way a chunk is tokenized,
        whether it is encoded inside a whole user or on its own (the user store's appends)."""
        enc = self.user_tokenizer(
            [chunk_text(c) for c in chunks], padding="max_length", truncation=True,
            max_length=self.config.towers.max_chunk_length, return_tensors="np",
        )
        return enc["input_ids"], enc["attention_mask"]

    # -- ragged tokens: what preprocessed shards store (no padding); `pad_sequences` pads at the batch
    def user_tokens(self, user: UserData | Sequence[UserChunk]) -> list[list[int]]:
        """Token ids of the `num_chunks_per_user` most recent chunks, each truncated to max_chunk_length."""
        chunks = user.chunks if isinstance(user, UserData) else list(user)
        if not chunks:
            raise ValueError("a user needs at least one chunk of text")
        kept = select_chunks(chunks, self.config.towers.num_chunks_per_user)
        enc = self.user_tokenizer([chunk_text(c) for c in kept], truncation=True,
                                  max_length=self.config.towers.max_chunk_length)
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def statement_tokens(self, statements: Sequence[Statement | str]) -> list[list[int]]:
        """Token ids of each statement (+ context within one max_statement + max_context budget), unpadded."""
        items = _checked_statements(statements)
        cfg = self.config
        texts = [s.text for s in items]
        contexts = [s.context for s in items]
        if cfg.towers.max_context_length > 0 and any(contexts):
            enc = self.item_tokenizer(texts, [c or "" for c in contexts], truncation="longest_first",
                                      max_length=self.item_length)
        else:
            enc = self.item_tokenizer(texts, truncation=True, max_length=cfg.towers.max_statement_length)
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def statement_features(self, statements: Sequence[Statement | str], prefix: str = "item") -> dict[str, np.ndarray]:
        """Batch of statements -> {prefix_input_ids (N, L), prefix_attention_mask, prefix_metadata?}."""
        items = _checked_statements(statements)
        cfg = self.config
        texts = [s.text for s in items]
        contexts = [s.context for s in items]
        kwargs: dict[str, Any] = dict(padding="max_length", max_length=self.item_length, return_tensors="np")
        if cfg.towers.max_context_length > 0 and any(contexts):
            # One budget of max_statement_length + max_context_length tokens; the longer part is cut first.
            enc = self.item_tokenizer(texts, [c or "" for c in contexts], truncation="longest_first", **kwargs)
        else:
            enc = self.item_tokenizer(texts, truncation=True,
                                      **{**kwargs, "max_length": cfg.towers.max_statement_length})
            pad = self.item_length - cfg.towers.max_statement_length
            if pad:
                left = self.item_tokenizer.padding_side == "left"
                widths = ((0, 0), (pad, 0)) if left else ((0, 0), (0, pad))
                enc = {
                    "input_ids": np.pad(
                        enc["input_ids"], widths, constant_values=self.item_tokenizer.pad_token_id or 0
                    ),
                    "attention_mask": np.pad(enc["attention_mask"], widths),
                }
        features = {
            f"{prefix}_input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
            f"{prefix}_attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
        }
        metadata = self.statement_metadata(items)
        if metadata is not None:
            features[f"{prefix}_metadata"] = metadata
        return features

    def statement_metadata(self, statements: Sequence[Statement | str]) -> np.ndarray | None:
        """(N, item_metadata_dim) hashed metadata of the statements when the item tower fuses it, else None
        (without tokenizing: statements read as cached vectors need only this)."""
        if not self.config.heads.use_item_metadata:
            return None
        dim = self.config.heads.item_metadata_dim
        rows = [hash_metadata(s.metadata, dim) for s in _checked_statements(statements)]
        return np.stack(rows) if rows else np.zeros((0, dim), np.float32)


def _used_columns(mask: torch.Tensor) -> slice:
    """The token columns that are real in some row (all of them when none is)."""
    used = mask.reshape(-1, mask.size(-1)).any(0).nonzero().squeeze(1)
    return slice(int(used[0]), int(used[-1]) + 1) if used.numel() else slice(None)


def trim_token_columns(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop token columns that are padding in every row (works for left and right padding)."""
    columns = _used_columns(mask)
    return ids[..., columns], mask[..., columns]


def trim_hidden_columns(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop token positions that are padding in every row of (..., L, H) hidden states and their (..., L) mask."""
    columns = _used_columns(mask)
    return hidden[..., columns, :], mask[..., columns]


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collated featurizer rows without the padding chunks and padding token columns the whole batch shares
    (results are unchanged): the fixed shapes Ray Data ships, cut to what the batch uses."""
    out = dict(batch)
    if "chunk_mask" in out:
        used_chunks = int(out["chunk_mask"].bool().sum(1).max())
        out["chunk_mask"] = out["chunk_mask"][:, :used_chunks].bool()
        ids, mask = out["user_input_ids"][:, :used_chunks], out["user_attention_mask"][:, :used_chunks]
        out["user_input_ids"], out["user_attention_mask"] = trim_token_columns(ids, mask)
    if "item_input_ids" in out:
        out["item_input_ids"], out["item_attention_mask"] = trim_token_columns(out["item_input_ids"],
                                                                               out["item_attention_mask"])
    return out


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False,
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> (N, length) ids and attention mask, padded to the longest (or `length`)."""
    width = max([len(s) for s in sequences] + [1]) if length is None else length
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        if left:
            ids[row, width - n:], mask[row, width - n:] = seq, 1
        else:
            ids[row, :n], mask[row, :n] = seq, 1
    return ids, mask


def collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-example feature dicts into a batch of tensors."""
    return {key: torch.as_tensor(np.stack([np.asarray(r[key]) for r in rows])) for key in rows[0]}
