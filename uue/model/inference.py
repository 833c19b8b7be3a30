"""Load a saved model and embed users and statements: the seed design's inference/evaluator API."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uue.data.schema import Statement, UserChunk, UserData
from uue.model.encode import ModelEmbedder
from uue.model.uue_model import UUEModel

ChunkLike = UserChunk | str | dict


def as_chunks(chunks: Sequence[ChunkLike]) -> list[UserChunk]:
    """Accept UserChunk objects, plain strings, or {text, platform, timestamp} dicts."""
    out = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, UserChunk):
            out.append(chunk)
        elif isinstance(chunk, str):
            out.append(UserChunk(text=chunk))
        elif isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
            out.append(UserChunk(text=chunk["text"], platform=chunk.get("platform"), timestamp=chunk.get("timestamp")))
        else:
            raise TypeError(f"chunk {i}: expected a UserChunk, a string or a dict with 'text', got {chunk!r:.80}")
        if not out[-1].text.strip():
            raise ValueError(f"chunk {i} has empty text")
    if not out:
        raise ValueError("a user needs at least one chunk of text")
    return out


class UUEInference:
    """Embeds users and statements with a trained model; vectors are unit-length numpy arrays."""

    def __init__(self, model: UUEModel | str | Path, device: str | torch.device | None = None, batch_size: int = 32):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = (model if isinstance(model, UUEModel) else UUEModel.from_pretrained(model)).to(self.device).eval()
        # Users from their tokens: a frozen backbone's vectors are the same, and no cache outlives a call.
        self.embedder = ModelEmbedder(self.model, self.device, batch_size, progress=False, cache_frozen=False)
        self.featurizer = self.embedder.featurizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> UUEInference:
        return cls(folder, **kwargs)

    @property
    def logit_scale(self) -> float:
        return float(self.model.clamped_logit_scale().detach())

    def encode_users(self, users: Sequence[UserData | Sequence[ChunkLike]]) -> np.ndarray:
        """(N, D) vectors for many users (UserData or chunk lists), `batch_size` users at a time."""
        return self.embedder.users([u if isinstance(u, UserData) else UserData("", as_chunks(u)) for u in users])

    def encode_statements(self, statements: Sequence[Statement | str]) -> np.ndarray:
        return self.embedder.statements(statements)

    def get_user_embedding(self, chunks: Sequence[ChunkLike], metadata: dict | None = None) -> np.ndarray:
        user = UserData(user_id="", chunks=as_chunks(chunks), metadata=metadata)
        return self.encode_users([user])[0]

    def get_statement_embedding(self, text: str, context: str | None = None) -> np.ndarray:
        return self.encode_statements([Statement(statement_id="", text=text, context=context)])[0]

    def compute_similarity(self, chunks: Sequence[ChunkLike], text: str) -> float:
        """Cosine similarity (dot product of unit vectors) of a user and a statement, in [-1, 1]."""
        return float(self.get_user_embedding(chunks) @ self.get_statement_embedding(text))


# The seed design called the class that loads a saved model and scores users an evaluator.
UUEEvaluator = UUEInference
