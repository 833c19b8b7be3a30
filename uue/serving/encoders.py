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

from uue.data.featurize import Featurizer, collate, hash_metadata, select_chunks, trim_batch, trim_token_columns
from uue.data.schema import Statement, UserChunk, UserData
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
        return self.config.embedding_dim

    def info(self) -> dict:
        return {"tower": self.tower_name, "dimension": self.dimension, "device": str(self.device),
                "num_chunks_per_user": self.config.num_chunks_per_user}


class UserEncoder(_TowerEncoder):
    """Users (chunk lists) -> unit vectors with the user tower."""

    tower_name = "user"

    def kept_chunks(self, user: UserData) -> UserData:
        """The chunks the model reads (the `num_chunks_per_user` most recent): what a batch budget counts."""
        return UserData(user.user_id, select_chunks(user.chunks, self.config.num_chunks_per_user),
                        metadata=user.metadata)

    @torch.inference_mode()
    def encode(self, users: Sequence[UserData]) -> np.ndarray:
        if not users:
            return np.zeros((0, self.dimension), np.float32)
        batch = trim_batch(collate([self.featurizer.user_features(u) for u in users]))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.tower(
            chunk_mask=batch["chunk_mask"], input_ids=batch["user_input_ids"],
            attention_mask=batch["user_attention_mask"], metadata=batch.get("user_metadata"),
        ).float().cpu().numpy()

    # The same tower forward split at the chunk vectors, for the user store: a new chunk is encoded once
    # (`chunk_vectors`), and the user vector is re-pooled from stored chunk vectors (`pool`) without
    # re-encoding the history. `encode(user)` == `pool([(chunk_vectors(kept chunks), metadata)])`.
    @property
    def hidden_size(self) -> int:
        return self.tower.encoder.hidden_size

    @torch.inference_mode()
    def chunk_vectors(self, chunks: Sequence[UserChunk]) -> np.ndarray:
        """(N, H) float32 encoder vectors of chunks: the user tower's input to pooling."""
        if not chunks:
            return np.zeros((0, self.hidden_size), np.float32)
        ids, mask = self.featurizer.chunk_tokens(chunks)
        ids, mask = trim_token_columns(torch.as_tensor(ids), torch.as_tensor(mask))
        vectors = self.tower.encode_chunks(ids.to(self.device), mask.to(self.device))
        return vectors.float().cpu().numpy()

    @torch.inference_mode()
    def pool(self, users: Sequence[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        """(chunk vectors (C, H), metadata) per user -> (B, D) unit user vectors (pooling, metadata, projection)."""
        if not users:
            return np.zeros((0, self.dimension), np.float32)
        longest = max(len(vectors) for vectors, _ in users)
        if longest > self.config.num_chunks_per_user:
            raise ValueError(f"{longest} chunk vectors for one user; the model reads at most "
                             f"{self.config.num_chunks_per_user} (select them first)")
        padded = np.zeros((len(users), longest, self.hidden_size), np.float32)
        chunk_mask = np.zeros((len(users), longest), bool)
        for row, (vectors, _) in enumerate(users):
            padded[row, : len(vectors)] = vectors
            chunk_mask[row, : len(vectors)] = True
        metadata = None
        if self.config.use_user_metadata:
            metadata = torch.as_tensor(np.stack([hash_metadata(m, self.config.metadata_dim) for _, m in users]))
            metadata = metadata.to(self.device)
        return self.tower(
            chunk_mask=torch.as_tensor(chunk_mask).to(self.device), metadata=metadata,
            chunk_vectors=torch.as_tensor(padded).to(self.device, self.dtype),
        ).float().cpu().numpy()

    def encode_and_pool(self, chunks: Sequence[UserChunk], stored: np.ndarray | None, kept_new: Sequence[int],
                        metadata: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """An append in one call: the new chunks' vectors, and the user pooled from `stored` + the kept new ones."""
        encoded = self.chunk_vectors(chunks)
        parts = ([stored] if stored is not None else []) + [encoded[list(kept_new)]]
        return encoded, self.pool([(np.concatenate(parts), metadata)])[0]

    def leave_one_out(self, vectors: np.ndarray, metadata: dict | None) -> np.ndarray:
        """(C, D): row c is the user vector without chunk c (zeros for a one-chunk user: no user, no score).

        Explanations compare a statement's score with and without each chunk; only pooling reruns."""
        if len(vectors) <= 1:
            return np.zeros((len(vectors), self.dimension), np.float32)
        return self.pool([(np.delete(vectors, c, axis=0), metadata) for c in range(len(vectors))])


class StatementEncoder(_TowerEncoder):
    """Statements -> unit vectors with the item tower, plus the tokens each used (for usage reports)."""

    tower_name = "item"

    @torch.inference_mode()
    def encode(self, statements: Sequence[Statement]) -> tuple[np.ndarray, list[int]]:
        if not statements:
            return np.zeros((0, self.dimension), np.float32), []
        features = self.featurizer.statement_features(list(statements))
        tokens = features["item_attention_mask"].sum(1).astype(int).tolist()
        batch = trim_batch({k: torch.as_tensor(v).to(self.device) for k, v in features.items()})
        vectors = self.tower(batch["item_input_ids"], batch["item_attention_mask"], batch.get("item_metadata"))
        return vectors.float().cpu().numpy(), tokens
