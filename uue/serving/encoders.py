"""One tower loaded on its own, turning requests into vectors: what a Serve replica (or a bare server) runs.

Each encoder loads only its tower folder (`load_tower`), so a user-tower replica never holds the item
tower's weights and vice versa. Featurization is the training code's (`Featurizer`), so served vectors
equal `UUEInference` vectors for the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from uue.data.featurize import Featurizer, select_chunks
from uue.data.schema import Statement, UserChunk, UserData
from uue.model.encode import StatementBatchEncoder, UserBatchEncoder
from uue.model.folder import read_tower_config
from uue.model.uue_model import load_tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _TowerEncoder:
    tower_name: str

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
        folder = Path(model_dir) / f"{self.tower_name}_tower"
        if not (folder / "tower.json").is_file():
            raise FileNotFoundError(f"{folder}/tower.json not found: {model_dir} is not a saved UUE model folder")
        self.model_dir = str(model_dir)
        self.device = _pick_device(device)
        self.config = read_tower_config(folder)
        tower, tokenizer = load_tower(folder, map_location=self.device)
        self.dtype = DTYPES[dtype]
        self.tower = tower.to(self.dtype).eval()
        self.tokenizer = tokenizer
        self.featurizer = Featurizer(self.config, tokenizer, tokenizer)

    @property
    def dimension(self) -> int:
        return self.tower.output_dim

    def info(self) -> dict:
        return {"tower": self.tower_name, "dimension": self.dimension, "device": str(self.device),
                "num_chunks_per_user": self.config.towers.num_chunks_per_user}


class UserEncoder(_TowerEncoder):
    """Users (chunk lists) -> unit vectors with the user tower."""

    tower_name = "user"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
        super().__init__(model_dir, device, dtype)
        self.batched = UserBatchEncoder(self.tower, self.featurizer, self.device, 2**31 - 1)  # Serve batches

    def kept_chunks(self, user: UserData) -> UserData:
        """The chunks the model reads (the `num_chunks_per_user` most recent): what a batch budget counts."""
        return UserData(user.user_id, select_chunks(user.chunks, self.config.towers.num_chunks_per_user),
                        metadata=user.metadata)

    def encode(self, users: Sequence[UserData]) -> np.ndarray:
        """One forward pass for the batch Serve collected."""
        return self.batched.encode(users)

    # The same tower forward split at the chunk vectors, for the user store: a new chunk is encoded once
    # (`chunk_vectors`), and the user vector is re-pooled from stored chunk vectors (`pool`) without
    # re-encoding the history. `encode(user)` == `pool([(chunk_vectors(kept chunks), metadata)])`.
    @property
    def hidden_size(self) -> int:
        return self.tower.encoder.hidden_size

    def chunk_vectors(self, chunks: Sequence[UserChunk]) -> np.ndarray:
        """(N, H) float32 encoder vectors of chunks: the user tower's input to pooling."""
        return self.batched.encode_chunks(chunks)

    def pool(self, users: Sequence[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        """(chunk vectors (C, H), metadata) per user -> (B, D) unit user vectors (pooling, metadata, projection)."""
        return self.batched.pool(users)

    def pool_appended(self, encoded: np.ndarray, stored: np.ndarray | None, kept_new: Sequence[int],
                      metadata: dict | None) -> np.ndarray:
        """The user vector after an append: pooled from its `stored` chunk vectors and the kept new ones."""
        parts = ([stored] if stored is not None else []) + [encoded[list(kept_new)]]
        return self.pool([(np.concatenate(parts), metadata)])[0]

    def encode_and_pool(self, chunks: Sequence[UserChunk], stored: np.ndarray | None, kept_new: Sequence[int],
                        metadata: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """An append in one call: the new chunks' vectors, and the user pooled from `stored` + the kept new ones."""
        encoded = self.chunk_vectors(chunks)
        return encoded, self.pool_appended(encoded, stored, kept_new, metadata)

    def leave_one_out(self, vectors: np.ndarray, metadata: dict | None) -> np.ndarray:
        """(C, D): row c is the user vector without chunk c (zeros for a one-chunk user: no user, no score).

        Explanations compare a statement's score with and without each chunk; only pooling reruns."""
        if len(vectors) <= 1:
            return np.zeros((len(vectors), self.dimension), np.float32)
        return self.pool([(np.delete(vectors, c, axis=0), metadata) for c in range(len(vectors))])


class StatementEncoder(_TowerEncoder):
    """Statements -> unit vectors with the item tower, plus the tokens each used (for usage reports)."""

    tower_name = "item"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
        super().__init__(model_dir, device, dtype)
        self.batched = StatementBatchEncoder(self.tower, self.device, 2**31 - 1, self.featurizer)  # Serve batches

    def encode(self, statements: Sequence[Statement]) -> tuple[np.ndarray, list[int]]:
        if not statements:
            return np.zeros((0, self.dimension), np.float32), []
        batch = self.batched.featurize(list(statements))
        tokens = batch.text.attention_mask.sum(1).tolist()
        return self.batched.encode_batches([batch]).numpy(), tokens
