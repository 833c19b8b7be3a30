"""What the towers read: one typed input per tower, whatever part of the backbone already ran.

A backbone turns token ids into one vector per text. When its bottom is frozen that work can be done once
and cached (uue.model.cache), so a tower reads one of three things, each `TowerInput`:
- tokens: `input_ids` with their `attention_mask`, (..., L): the backbone runs whole;
- vectors: (..., H) pooled outputs of a frozen backbone: the backbone does not run;
- hidden states: `hidden` (..., L, H) entering block `layer`, with their `attention_mask`: blocks `layer`.. run.
The leading dimensions are the texts: (N,) statements, or (B, C) users x chunks. `UserBatch` and
`StatementBatch` add what the heads read beside the backbone (the chunk mask, metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, Protocol

import numpy as np
import torch

from uue.data.featurize import trim_hidden_columns, trim_token_columns

InputKind = Literal["tokens", "vectors", "hidden"]


def _pad_columns(values: torch.Tensor, width: int, fill: int, left: bool) -> torch.Tensor:
    """(N, L) -> (N, width), the new columns on the padding side."""
    extra = width - values.size(-1)
    if extra <= 0:
        return values
    pad = values.new_full((values.size(0), extra), fill)
    return torch.cat([pad, values] if left else [values, pad], dim=-1)


@dataclass
class TowerInput:
    """Exactly one of: token ids + mask, cached vectors, or hidden states at block `layer` + mask."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("input_ids", "vectors", "hidden") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a tower input holds exactly one of input_ids, vectors or hidden, got {given or 'none'}")
        if self.vectors is None and self.attention_mask is None:
            raise ValueError(f"{given[0]} need their attention_mask")
        if self.hidden is not None and self.layer is None:
            raise ValueError("hidden states need the block `layer` they enter")

    @property
    def kind(self) -> InputKind:
        return "tokens" if self.input_ids is not None else "vectors" if self.vectors is not None else "hidden"

    @property
    def rows(self) -> int:
        return int(next(t for t in self._tensors().values()).shape[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: value for f in fields(self) if isinstance(value := getattr(self, f.name), torch.Tensor)}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TowerInput:
        """The same input with `fn` applied to each tensor (to a device, a slice of rows, reshaped)."""
        return replace(self, **{name: fn(value) for name, value in self._tensors().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TowerInput:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def trimmed(self) -> TowerInput:
        """Token columns that are padding in every row cut off (left or right padding; results are unchanged)."""
        if self.hidden is not None:
            hidden, mask = trim_hidden_columns(self.hidden, self.attention_mask)
            return replace(self, hidden=hidden, attention_mask=mask)
        if self.input_ids is not None:
            ids, mask = trim_token_columns(self.input_ids, self.attention_mask)
            return replace(self, input_ids=ids, attention_mask=mask)
        return self

    def backbone_tokens(self) -> int:
        """Real tokens the backbone runs on from the start (cached vectors and hidden states: none)."""
        return int(self.attention_mask.sum()) if self.kind == "tokens" else 0


@dataclass
class UserBatch:
    """B users for the user tower: their chunks (B, C, ...), which chunks are real, their hashed metadata."""

    chunks: TowerInput
    chunk_mask: torch.Tensor  # (B, C) bool
    metadata: torch.Tensor | None = None  # (B, metadata_dim)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UserBatch:
        return UserBatch(self.chunks.to(device, non_blocking), self.chunk_mask.to(device, non_blocking=non_blocking),
                         None if self.metadata is None else self.metadata.to(device, non_blocking=non_blocking))

    @classmethod
    def from_features(cls, features: Mapping[str, torch.Tensor]) -> UserBatch:
        """Collated `Featurizer.user_features` rows (user_input_ids, user_attention_mask, chunk_mask, user_metadata)."""
        chunks = TowerInput(features["user_input_ids"], features["user_attention_mask"])
        return cls(chunks, features["chunk_mask"].bool(), features.get("user_metadata"))

    def rows(self, index: slice | torch.Tensor) -> UserBatch:
        """The users at `index`."""
        return UserBatch(self.chunks.map(lambda t: t[index]), self.chunk_mask[index],
                         None if self.metadata is None else self.metadata[index])


@dataclass
class StatementBatch:
    """N statements for the item tower: their text (N, ...) and hashed metadata."""

    text: TowerInput
    metadata: torch.Tensor | None = None  # (N, item_metadata_dim)

    def __len__(self) -> int:
        return self.text.rows

    @classmethod
    def from_features(cls, features: Mapping[str, torch.Tensor | np.ndarray]) -> StatementBatch:
        """`Featurizer.statement_features` (item_input_ids, item_attention_mask, item_metadata)."""
        tensors = {name: torch.as_tensor(value) for name, value in features.items()}
        return cls(TowerInput(tensors["item_input_ids"], tensors["item_attention_mask"]), tensors.get("item_metadata"))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StatementBatch:
        return StatementBatch(self.text.to(device, non_blocking),
                              None if self.metadata is None else self.metadata.to(device, non_blocking=non_blocking))

    def rows(self, index: slice | torch.Tensor) -> StatementBatch:
        """The statements at `index` (a slice, or indices of any shape, flattened)."""
        if isinstance(index, torch.Tensor):
            index = index.reshape(-1)
        metadata = None if self.metadata is None else self.metadata[index]
        return StatementBatch(self.text.map(lambda t: t[index]), metadata)

    def trimmed(self) -> StatementBatch:
        return StatementBatch(self.text.trimmed(), self.metadata)

    def gather(self, indices: Sequence[int] | torch.Tensor) -> StatementBatch:
        """The statements at `indices`, without the token columns none of them uses (a statement pool's read)."""
        return self.rows(torch.as_tensor(indices)).trimmed()

    @staticmethod
    def concatenate(parts: Sequence[StatementBatch], pad_id: int, left: bool) -> StatementBatch | None:
        """Several statement sets as one batch (token columns padded to the widest, on the tokenizer's side), so
        the item tower runs once on all of them; None when they cannot share one call (hidden states, or sets
        of different kinds)."""
        first = parts[0]
        kinds = {(part.text.kind, part.metadata is not None) for part in parts}
        if len(kinds) > 1 or first.text.kind == "hidden":
            return None
        if first.text.kind == "tokens":
            width = max(part.text.input_ids.size(-1) for part in parts)
            texts = [TowerInput(_pad_columns(part.text.input_ids, width, pad_id, left),
                                _pad_columns(part.text.attention_mask, width, 0, left)) for part in parts]
            text = TowerInput(torch.cat([t.input_ids for t in texts]), torch.cat([t.attention_mask for t in texts]))
        else:
            text = TowerInput(vectors=torch.cat([part.text.vectors for part in parts]))
        metadata = torch.cat([part.metadata for part in parts]) if first.metadata is not None else None
        return StatementBatch(text, metadata)


class StatementPool(Protocol):
    """Statements by index: what samplers draw from and the negative refresh encodes (the training loop's
    statement table, or a StatementBatch)."""

    def __len__(self) -> int: ...

    def gather(self, indices: Sequence[int] | torch.Tensor) -> StatementBatch: ...
