"""One batched encoder per tower: how many users or statements become vectors, a bounded batch at a time.

Evaluation, inference (`UUEInference`), serving, the index build's actors and the training loop's negative
refresh all call these; they differ only in where texts come from and on which device and dtype the tower
runs. Users: featurized chunks -> the user tower, `batch_size` users at a time (the tower micro-batches the
chunks); with a frozen-prefix cache each distinct chunk is encoded once and the tower reads cached vectors.
Statements: featurized texts (or a statement pool's rows) -> the item tower, `batch_size` at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from uue.data.featurize import Featurizer, collate, hash_metadata, trim_batch
from uue.data.schema import Statement, UserChunk, UserData
from uue.model.cache import FrozenPrefixCache, resolve_cache_dir
from uue.model.inputs import StatementBatch, StatementPool, TowerInput, UserBatch
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class UserBatchEncoder:
    """Users -> (N, embedding_dim) unit vectors with a user tower; `cache`: read the chunks as cached vectors."""

    def __init__(self, tower: UserTower, featurizer: Featurizer, device: torch.device | str = "cpu",
                 batch_size: int = 32, cache: FrozenPrefixCache | None = None):
        self.tower = tower
        self.featurizer = featurizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache = cache
        self.config = featurizer.config

    @property
    def dimension(self) -> int:
        return self.tower.output_dim

    @torch.no_grad()
    def encode(self, users: Sequence[UserData]) -> np.ndarray:
        """Users -> unit vectors, `batch_size` users at a time (from their chunk tokens, or cached vectors)."""
        if self.cache is not None:
            return self.encode_vectors(self.chunk_vectors(users), [u.metadata for u in users])
        return self._run(self._token_batch(users[start : start + self.batch_size])
                         for start in range(0, len(users), self.batch_size))

    @torch.no_grad()
    def encode_vectors(self, chunk_vectors: Sequence[np.ndarray], metadata: Sequence[dict | None]) -> np.ndarray:
        """Each user's (C, H) chunk vectors (`chunk_vectors`) and metadata -> unit vectors, `batch_size` users at a
        time: the tower above the backbone, for callers that read users' chunk vectors once and pool them
        more than one way (the pretrained path's fit)."""
        size = self.batch_size
        return self._run(self._vector_batch(chunk_vectors[start : start + size], metadata[start : start + size])
                         for start in range(0, len(chunk_vectors), size))

    def _run(self, batches: Iterable[UserBatch]) -> np.ndarray:
        """Each batch through the user tower -> (N, D) float32 vectors."""
        vectors = [self.tower(b.chunks, b.chunk_mask, b.metadata).float().cpu().numpy() for b in batches]
        return np.concatenate(vectors) if vectors else np.zeros((0, self.dimension), np.float32)

    def _token_batch(self, users: Sequence[UserData]) -> UserBatch:
        features = trim_batch(collate([self.featurizer.user_features(user) for user in users]))
        return UserBatch.from_features(features).to(self.device)

    def _vector_batch(self, vectors: Sequence[np.ndarray], metadata: Sequence[dict | None]) -> UserBatch:
        """(C, H) chunk vectors per user -> a batch padded to its user with the most chunks."""
        padded = np.zeros((len(vectors), max(len(v) for v in vectors), vectors[0].shape[-1]), np.float32)
        chunk_mask = np.zeros(padded.shape[:2], bool)
        for row, user in enumerate(vectors):
            padded[row, : len(user)] = user
            chunk_mask[row, : len(user)] = True
        hashed = None
        if self.config.heads.use_user_metadata:
            hashed = torch.as_tensor(np.stack([hash_metadata(m, self.config.heads.metadata_dim) for m in metadata]))
        chunks = TowerInput(vectors=torch.as_tensor(padded).to(self.device, _dtype_of(self.tower)))
        return UserBatch(chunks, torch.as_tensor(chunk_mask), hashed).to(self.device)

    def chunk_vectors(self, users: Sequence[UserData]) -> list[np.ndarray]:
        """Each user's (C, H) backbone vectors of the chunks the model reads, from the cache (each distinct chunk
        encoded once), in the featurizer's chunk order."""
        if self.cache is None:
            raise ValueError("chunk_vectors of whole users needs a frozen-prefix cache")
        tokens = [self.featurizer.user_tokens(user) for user in users]
        entries = self.cache.lookup([chunk for user in tokens for chunk in user])
        self.cache.save()  # one call scores a whole split: keep what it encoded for the next process
        ends = np.cumsum([len(user) for user in tokens])
        return [np.stack(entries[end - len(user) : end]) for user, end in zip(tokens, ends, strict=True)]

    @torch.no_grad()
    def encode_chunks(self, chunks: Sequence[UserChunk]) -> np.ndarray:
        """(N, H) float32 backbone vectors of chunks on their own (the user tower's input to pooling)."""
        if not chunks:
            return np.zeros((0, self.tower.encoder.hidden_size), np.float32)
        ids, mask = self.featurizer.chunk_tokens(chunks)
        tokens = TowerInput(torch.as_tensor(ids), torch.as_tensor(mask)).trimmed().to(self.device)
        return self.tower.encode_chunks(tokens).float().cpu().numpy()

    @torch.no_grad()
    def pool(self, users: Sequence[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        """(chunk vectors (C, H), metadata) per user -> (B, D) unit user vectors (pooling, metadata, projection)."""
        if not users:
            return np.zeros((0, self.dimension), np.float32)
        limit = self.config.towers.num_chunks_per_user
        longest = max(len(vectors) for vectors, _ in users)
        if longest > limit:
            raise ValueError(f"{longest} chunk vectors for one user; the model reads at most {limit} (select them "
                             "first)")
        return self.encode_vectors([vectors for vectors, _ in users], [metadata for _, metadata in users])


class StatementBatchEncoder:
    """Statements -> (N, embedding_dim) unit vectors with an item tower, `batch_size` at a time.

    `featurizer` is needed to encode texts (`encode`, `featurize`); a statement pool's rows need none. `cache`
    (a frozen item backbone's frozen-prefix cache): texts are read as their cached backbone vectors, each distinct
    text encoded once in the process (training's statement table, evaluation, the path's fit share them)."""

    def __init__(self, tower: ItemTower, device: torch.device | str = "cpu", batch_size: int = 32,
                 featurizer: Featurizer | None = None, cache: FrozenPrefixCache | None = None):
        if cache is not None and not cache.keeps_vectors:
            raise ValueError("a statement encoder reads whole-backbone vectors from its cache, not hidden states")
        self.tower = tower
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.featurizer = featurizer
        self.cache = cache

    def featurize(self, statements: Sequence[Statement | str]) -> StatementBatch:
        """Statements -> their batch, without the token columns none of them uses."""
        if self.featurizer is None:
            raise ValueError("encoding statement texts needs the tower's featurizer")
        return StatementBatch.from_features(self.featurizer.statement_features(statements)).trimmed()

    @torch.no_grad()
    def encode_batches(self, batches: Iterable[StatementBatch]) -> torch.Tensor:
        """Each batch through the item tower -> all vectors, float32 on the CPU."""
        vectors = [self.tower(b.text, b.metadata).float().cpu() for b in (batch.to(self.device) for batch in batches)]
        return torch.cat(vectors) if vectors else torch.zeros((0, self.tower.output_dim))

    @torch.no_grad()
    def encode_ragged(self, token_ids: Sequence[Sequence[int] | np.ndarray], metadata: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Unpadded token id lists -> vectors, float32 on the CPU, through the tower's packed path (packed indexing
        tokenizes in tasks of its own)."""
        if metadata is not None:
            metadata = metadata.to(self.device)
        return self.tower.forward_ragged(token_ids, metadata).float().cpu()

    def encode(self, statements: Sequence[Statement | str]) -> np.ndarray:
        """Statement texts (+ context, metadata) -> unit vectors, featurized `batch_size` at a time (with a cache:
        the item tower above its backbone, on each text's cached vector)."""
        size = self.batch_size
        if self.cache is None:
            batches = (self.featurize(statements[start : start + size]) for start in range(0, len(statements), size))
        else:
            pooled = torch.as_tensor(self.backbone_vectors(statements)).to(_dtype_of(self.tower))
            metadata = self.featurizer.statement_metadata(statements)
            metadata = None if metadata is None or self.tower.metadata is None else torch.as_tensor(metadata)
            batches = (StatementBatch(TowerInput(vectors=pooled[start : start + size]),
                                      None if metadata is None else metadata[start : start + size])
                       for start in range(0, len(statements), size))
        return self.encode_batches(batches).numpy()

    def backbone_vectors(self, statements: Sequence[Statement | str]) -> np.ndarray:
        """(N, H) float32 vectors of the item backbone alone (the tower's pooled text, before any head): from the
        cache when there is one, else `batch_size` texts at a time through the backbone."""
        if self.featurizer is None:
            raise ValueError("encoding statement texts needs the tower's featurizer")
        if not statements:
            return np.zeros((0, self.tower.encoder.hidden_size), np.float32)
        if self.cache is not None:
            vectors = np.stack(self.cache.lookup(self.featurizer.statement_tokens(statements)))
            self.cache.save()
            return vectors.astype(np.float32, copy=False)
        out = []
        with torch.no_grad():
            for start in range(0, len(statements), self.batch_size):
                batch = self.featurize(statements[start : start + self.batch_size]).to(self.device)
                out.append(self.tower.encoder.encode(batch.text).float().cpu().numpy())
        return np.concatenate(out)

    def encode_pool(self, pool: StatementPool) -> torch.Tensor:
        """Every statement of a pool, `batch_size` rows at a time (the training loop's negative refresh)."""
        size, total = self.batch_size, len(pool)
        return self.encode_batches(pool.gather(range(start, min(start + size, total)))
                                   for start in range(0, total, size))


def shared_cache(encoder: Any, tokenizer: Any, device: torch.device | str, micro_batch: int, cache_dir: str | None,
                 label: str | None) -> FrozenPrefixCache:
    """A frozen backbone's cache on the process's shared table (and the cache folder, if any): evaluation's, the
    demo's and the path's fit; `label`: its progress bar's (None: no bar)."""
    cache = FrozenPrefixCache(encoder, tokenizer, device=device, micro_batch=micro_batch,
                              cache_dir=resolve_cache_dir(cache_dir), shared=True)
    cache.progress = label
    return cache


class ModelEmbedder:
    """A UUE model's users and statements -> unit vectors (numpy): evaluation, calibration, inference, the demo.

    `cache_frozen` (default: when a tower's backbone is frozen) reads each distinct chunk's or statement's
    backbone vector from the frozen-prefix cache the process shares (and `cache_dir` keeps on disk), so the texts
    training encoded, or another split, are not encoded again; False: never (serving, whose texts do not repeat)."""

    name = "model"

    def __init__(self, model: UUEModel, device: torch.device | str, batch_size: int = 32, progress: bool = True,
                 cache_frozen: bool | None = None, cache_dir: str | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        config = model.config
        self.featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
        chunk_cache = statement_cache = None
        micro_batch = config.towers.encode_micro_batch
        if config.towers.freeze_user_backbone if cache_frozen is None else cache_frozen:
            chunk_cache = shared_cache(model.user_tower.encoder, model.user_tokenizer, self.device, micro_batch,
                                       cache_dir, "user chunk vectors" if progress else None)
        if config.towers.freeze_item_backbone and cache_frozen is not False:
            statement_cache = shared_cache(model.item_tower.encoder, model.item_tokenizer, self.device, micro_batch,
                                           cache_dir, "statement vectors" if progress else None)
        self.user_encoder = UserBatchEncoder(model.user_tower, self.featurizer, self.device, batch_size, chunk_cache)
        self.statement_encoder = StatementBatchEncoder(model.item_tower, self.device, batch_size, self.featurizer,
                                                       statement_cache)

    def users(self, users: Sequence[UserData]) -> np.ndarray:
        return self.user_encoder.encode(users)

    def statements(self, statements: Sequence[Statement | str]) -> np.ndarray:
        return self.statement_encoder.encode(statements)
