"""Chunk vectors of a frozen user backbone, computed once per user and reused.

With `model.freeze_user_backbone: true` the backbone maps a chunk to the same vector at every step, so
encoding each user's chunks once and training only what sits above (attention pooling, metadata
fusion, projection) gives the same model as re-encoding every step, at a fraction of the cost: on a
2-core CPU the user backbone is most of the work. `model.cache_chunk_vectors: true` turns this on in
`UUETrainer`; evaluation uses the same cache for frozen-backbone models and the untrained baseline.

Vectors are kept per distinct chunk (a digest of its tokens), in a table keyed by a fingerprint of the
backbone weights and the featurization settings: evaluation's caches of one backbone share it within a
process. With `UUE_CHUNK_CACHE_DIR` set the table is also kept on disk (`chunk-table-<fingerprint>.pkl`,
written by training and evaluation alike), so runs that share a frozen backbone (option comparisons, seeds,
a later `uue evaluate`, other splits) encode each chunk once between them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from uue.data.featurize import Featurizer, trim_token_columns
from uue.data.schema import UserData
from uue.model.backbone import TextEncoder


@dataclass
class _ChunkTable:
    """Digest of a chunk's tokens -> the encoded chunk, and how many entries the file on disk holds."""

    chunks: dict[bytes, Any] = field(default_factory=dict)
    saved_size: int = 0


_SHARED: dict[str, _ChunkTable] = {}
"""kind-fingerprint -> the chunk table every cache of that backbone in this process shares (and writes)."""
CACHE_DIR_ENV = "UUE_CHUNK_CACHE_DIR"


def _disk_cache_enabled() -> bool:
    """Whether UUE_CHUNK_CACHE_DIR names a folder: only then is a fingerprint worth computing."""
    return bool(os.environ.get(CACHE_DIR_ENV))


def _shared_table(fingerprint: str, kind: str) -> _ChunkTable:
    """The process's one table of `kind` for a backbone, read from UUE_CHUNK_CACHE_DIR the first time."""
    key = f"{kind}-{fingerprint}"
    if key not in _SHARED:
        chunks = _load_from_disk(fingerprint, kind)
        _SHARED[key] = _ChunkTable(chunks, len(chunks))
    return _SHARED[key]


def _disk_file(fingerprint: str, kind: str) -> Path | None:
    folder = os.environ.get(CACHE_DIR_ENV)
    return Path(folder) / f"{kind}-{fingerprint}.pkl" if folder else None


def _load_from_disk(fingerprint: str, kind: str) -> dict:
    path = _disk_file(fingerprint, kind)
    if path is None or not path.is_file():
        return {}
    with path.open("rb") as f:
        return pickle.load(f)  # a file this process family wrote (local cache, not shared input)


def _save_to_disk(fingerprint: str, entries: dict, kind: str) -> None:
    path = _disk_file(fingerprint, kind)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    with partial.open("wb") as f:
        pickle.dump(entries, f, protocol=pickle.HIGHEST_PROTOCOL)
    partial.replace(path)  # atomic: a concurrent reader sees the old file or the new one


def _hash_weights(digest: hashlib.blake2b, module: torch.nn.Module) -> None:
    """Feed every weight (by name, as fp32 bytes) into `digest`: cache keys change whenever a weight does."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def backbone_fingerprint(encoder: TextEncoder, featurizer: Featurizer) -> str:
    """Hash of the weights and of what decides a chunk's tokens (lengths, tokenizer, pooling)."""
    digest = hashlib.blake2b(digest_size=16)
    cfg = featurizer.config
    digest.update(f"{encoder.pooling}|{cfg.max_chunk_length}|{cfg.num_chunks_per_user}|".encode())
    digest.update(type(featurizer.user_tokenizer).__name__.encode())
    digest.update(str(len(featurizer.user_tokenizer)).encode())
    _hash_weights(digest, encoder.backbone)
    return digest.hexdigest()


def _user_key(user: UserData) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for chunk in user.chunks:
        digest.update(f"{chunk.platform}\x1f{chunk.timestamp}\x1f{chunk.text}\x1e".encode())
    return f"{user.user_id}:{digest.hexdigest()}"


class ChunkVectorCache:
    """user -> (real chunks, H) vectors of one frozen backbone, for evaluation; `features(user)` pads them.

    A per-user view over the training loop's chunk table (`TokenChunkCache`, sharing its fingerprint): each
    distinct chunk is encoded once per process for every cache of one backbone (the model's and the
    baseline's, each split), and with `UUE_CHUNK_CACHE_DIR` set it lands in the same `chunk-table-*` file
    that training writes, so a run's evaluation re-encodes nothing its training already encoded.
    """

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, device: str | torch.device = "cpu",
                 micro_batch: int | None = None, progress: bool = True):
        self.encoder = encoder
        self.featurizer = featurizer
        self.fingerprint = backbone_fingerprint(encoder, featurizer)
        self.table = TokenChunkCache(encoder, featurizer, device, micro_batch, fingerprint=self.fingerprint)
        self.progress = progress
        self.vectors: dict[str, np.ndarray] = {}
        """_user_key(user) -> its (real chunks, H) vectors, in the featurizer's chunk order."""

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    def precompute(self, users: Sequence[UserData], desc: str = "chunk vectors") -> int:
        """Look up (encoding what the chunk table lacks) every user not seen yet; returns the chunks encoded."""
        todo = {key: user for user in users if (key := _user_key(user)) not in self.vectors}
        if not todo:
            return 0
        rows = [{"user_id": key, "chunk_tokens": self.featurizer.user_tokens(user)} for key, user in todo.items()]
        before = self.table.encoded_chunks
        self.table.progress = desc if self.progress else None
        for key, vectors in zip(todo, self.table(rows), strict=True):
            self.vectors[key] = vectors
        self.table.entries.clear()  # the per-user arrays live in self.vectors; the table keeps the chunks
        self.table.flush()  # one call scores a whole split: keep what it encoded for the next process
        return self.table.encoded_chunks - before

    def chunk_vectors(self, user: UserData) -> np.ndarray:
        key = _user_key(user)
        if key not in self.vectors:
            self.precompute([user])
        return self.vectors[key]

    def features(self, user: UserData) -> dict[str, np.ndarray]:
        """{chunk_vectors (C, H), chunk_mask (C,)} padded to num_chunks_per_user, like the token features."""
        vectors = self.chunk_vectors(user)
        limit = self.featurizer.config.num_chunks_per_user
        padded = np.zeros((limit, vectors.shape[1]), dtype=np.float32)
        padded[: len(vectors)] = vectors
        mask = np.zeros(limit, dtype=bool)
        mask[: len(vectors)] = True
        features = {"chunk_vectors": padded, "chunk_mask": mask}
        if self.featurizer.config.use_user_metadata:
            from uue.data.featurize import hash_metadata

            features["user_metadata"] = hash_metadata(user.metadata, self.featurizer.config.metadata_dim)
        return features


@torch.inference_mode()
def statement_vector_features(encoder: TextEncoder, features: dict[str, np.ndarray], batch_size: int = 64,
                              device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Token features of a statement pool -> {item_text_vectors (S, H), item_metadata?} of a frozen backbone.

    The statement-side twin of the chunk cache (`model.cache_statement_vectors`): the item tower then
    trains only its metadata fusion and projection, on vectors computed once.
    """
    ids = torch.as_tensor(features["item_input_ids"])
    mask = torch.as_tensor(features["item_attention_mask"])
    key = None
    if _disk_cache_enabled():  # UUE_CHUNK_CACHE_DIR: the same weights and tokens give the same vectors
        digest = hashlib.blake2b(digest_size=16)
        _hash_weights(digest, encoder.backbone)
        digest.update(f"{encoder.pooling}|{tuple(ids.shape)}".encode())
        digest.update(ids.numpy().tobytes())
        digest.update(mask.numpy().tobytes())
        key = digest.hexdigest()
        stored = _load_from_disk(key, "statements")
        if "item_text_vectors" in stored:
            return {**stored, **({"item_metadata": features["item_metadata"]} if "item_metadata" in features else {})}
    was_training = encoder.training
    encoder.eval()
    vectors = []
    for start in range(0, len(ids), batch_size):
        batch_ids, batch_mask = trim_token_columns(ids[start : start + batch_size], mask[start : start + batch_size])
        vectors.append(encoder(batch_ids.to(device), batch_mask.to(device)).float().cpu())
    encoder.train(was_training)
    out = {"item_text_vectors": torch.cat(vectors).numpy()}
    if key is not None:
        _save_to_disk(key, out, "statements")
    if "item_metadata" in features:
        out["item_metadata"] = features["item_metadata"]
    return out


# ------------------------------------------------------------------ hidden states at a cut (top-N layers)
def cut_layer(encoder: TextEncoder, trainable_layers: int) -> int:
    """The block index where training starts when only the top `trainable_layers` blocks train."""
    from uue.model.backbone import transformer_layers

    total = len(transformer_layers(encoder.backbone))
    if not 0 < trainable_layers <= total:
        raise ValueError(f"trainable_layers must be 1..{total} for a {total}-layer backbone, got {trainable_layers}")
    return total - trainable_layers


class HiddenStateCache:
    """user -> hidden states of their real chunks entering block `layer` of a backbone whose blocks below
    `layer` are frozen: they run once, and a training step runs only the top blocks on the cache
    (`model.cache_hidden_states`). `features(user)` has the same keys the user tower reads from tokens,
    with `chunk_hidden` (C, L, H) in place of the token ids. Stored in `dtype` (float16 halves memory)."""

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, layer: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float16, micro_batch: int | None = None, progress: bool = True):
        self.encoder = encoder
        self.featurizer = featurizer
        self.layer = layer
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = micro_batch or featurizer.config.encode_micro_batch
        self.progress = progress
        self.entries: dict[str, dict[str, np.ndarray]] = {}

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @torch.inference_mode()
    def precompute(self, users: Sequence[UserData], desc: str = "hidden states at the cut") -> int:
        from uue.model.backbone import hidden_states_at

        todo = [u for key, u in {_user_key(u): u for u in users}.items() if key not in self.entries]
        was_training = self.encoder.training
        self.encoder.eval()  # the frozen bottom runs as at inference (no dropout), once
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        for start in tqdm(range(0, len(todo), self.micro_batch), desc=desc, disable=not self.progress):
            for user in todo[start : start + self.micro_batch]:
                feats = self.featurizer.user_features(user)
                hidden = np.zeros((*feats["user_input_ids"].shape, self.hidden_size), dtype=np_dtype)
                real = int(feats["chunk_mask"].sum())
                ids = torch.as_tensor(feats["user_input_ids"][:real])
                mask = torch.as_tensor(feats["user_attention_mask"][:real])
                states = hidden_states_at(self.encoder.backbone, ids.to(self.device), mask.to(self.device), self.layer)
                hidden[:real] = states.to(self.dtype).cpu().numpy()
                entry = {"chunk_hidden": hidden, "user_attention_mask": feats["user_attention_mask"],
                         "chunk_mask": feats["chunk_mask"]}
                if "user_metadata" in feats:
                    entry["user_metadata"] = feats["user_metadata"]
                self.entries[_user_key(user)] = entry
        self.encoder.train(was_training)
        return len(todo)

    def features(self, user: UserData) -> dict[str, np.ndarray]:
        """{chunk_hidden (C, L, H), user_attention_mask (C, L), chunk_mask (C,)[, user_metadata]}, padded like
        the token features; the arrays are the cache's own (not copied), so callers must not write to them."""
        key = _user_key(user)
        if key not in self.entries:
            self.precompute([user])
        return self.entries[key]


@torch.inference_mode()
def statement_hidden_features(encoder: TextEncoder, features: dict[str, np.ndarray], layer: int,
                              batch_size: int = 64, device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float16) -> dict[str, np.ndarray]:
    """Token features of a statement pool -> {item_hidden (S, L, H), item_attention_mask[, item_metadata]}:
    the statement-side twin of HiddenStateCache (the item tower then runs only its top blocks)."""
    from uue.model.backbone import hidden_states_at

    ids = torch.as_tensor(features["item_input_ids"])
    mask = torch.as_tensor(features["item_attention_mask"])
    was_training = encoder.training
    encoder.eval()
    parts = []
    for start in range(0, len(ids), batch_size):
        states = hidden_states_at(encoder.backbone, ids[start : start + batch_size].to(device),
                                  mask[start : start + batch_size].to(device), layer)
        parts.append(states.to(dtype).cpu())
    encoder.train(was_training)
    out = {"item_hidden": torch.cat(parts).numpy(), "item_attention_mask": features["item_attention_mask"]}
    if "item_metadata" in features:
        out["item_metadata"] = features["item_metadata"]
    return out


class TokenChunkCache:
    """user_id -> (chunks, H) vectors of a frozen user backbone, from preprocessed chunk tokens, on first use.

    The training loop's `model.cache_chunk_vectors`: a user's chunks are encoded the first time one of its
    batches is collated (in one process or a Ray worker alike) and reused in later epochs. Chunks are cached
    by their tokens, so a chunk that many users share (one MovieLens rating line, a forwarded message) is
    encoded once. With `UUE_CHUNK_CACHE_DIR` set that chunk table is also kept on disk, keyed by the
    backbone's fingerprint, so option comparisons and seeds on one frozen backbone encode each chunk once
    between them. The file is rewritten as the table grows by a quarter, and once more on the first batch
    that needs no encoding (at the latest the second epoch); a run that stops early keeps what was written.
    """

    disk_kind: str | None = "chunk-table"
    """The on-disk file's kind (None: memory only, as for hidden states, which are too large to keep)."""

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, device: str | torch.device = "cpu",
                 micro_batch: int | None = None, fingerprint: str | None = None):
        """`fingerprint`: the backbone's, when the caller has it (evaluation always does); a cache with one
        shares the process's table of that backbone. Without it, one is computed only if UUE_CHUNK_CACHE_DIR
        is set (hashing a large backbone's weights costs seconds per worker)."""
        from uue.data.featurize import pad_sequences

        self._pad = pad_sequences
        self.encoder = encoder
        self.device = torch.device(device)
        self.micro_batch = micro_batch or featurizer.config.encode_micro_batch
        tokenizer = featurizer.user_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.entries: dict[str, Any] = {}
        """user_id -> its cache entry (what `_keep` makes of its encoded chunks, in order)."""
        if fingerprint is None and self.disk_kind and _disk_cache_enabled():
            fingerprint = backbone_fingerprint(encoder, featurizer)
        self.fingerprint = fingerprint if self.disk_kind else None
        self._table = _shared_table(self.fingerprint, self.disk_kind) if self.fingerprint else _ChunkTable()
        self.chunks = self._table.chunks
        """Digest of a chunk's tokens -> the encoded chunk."""
        self.encoded_chunks = 0
        """Chunks this cache ran through the backbone (the rest were shared or read from disk)."""
        self.progress: str | None = None
        """A progress bar's label while encoding (evaluation sets it); None: no bar (the training loop)."""

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> Sequence[np.ndarray]:
        """One micro-batch of padded chunks -> what is kept of each chunk (here its (H,) vector)."""
        return self.encoder(ids, mask).float().cpu().numpy()

    def _keep(self, chunks: list[np.ndarray]) -> Any:
        """A user's encoded chunks, in order -> its cache entry."""
        return np.stack(chunks)

    @staticmethod
    def _chunk_key(tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()

    def _encode_missing(self, missing: dict[bytes, Sequence[int]]) -> None:
        keys = sorted(missing, key=lambda k: -len(missing[k]))  # similar lengths share a micro-batch
        was_training = self.encoder.training
        self.encoder.eval()
        total = sum(len(t) for t in missing.values())
        with tqdm(total=total, desc=self.progress, unit="tok", unit_scale=True, disable=self.progress is None) as bar:
            for start in range(0, len(keys), self.micro_batch):
                batch_keys = keys[start : start + self.micro_batch]
                ids, mask = self._pad([missing[k] for k in batch_keys], self.pad_id, self.left)
                outputs = self._encode(torch.as_tensor(ids, device=self.device),
                                       torch.as_tensor(mask, device=self.device))
                self.chunks.update(zip(batch_keys, outputs, strict=True))
                bar.update(int(mask.sum()))
        self.encoder.train(was_training)
        self.encoded_chunks += len(keys)

    def _to_disk(self, encoded_any: bool) -> None:
        pending = len(self.chunks) - self._table.saved_size
        if pending and (not encoded_any or pending >= max(64, self._table.saved_size // 4)):
            self.flush()

    def flush(self) -> None:
        """Write the table to UUE_CHUNK_CACHE_DIR now if it grew since anyone's last write (no-op when unset):
        caches that share a table share its saved size, so none rewrites what another already wrote."""
        if self.fingerprint and len(self.chunks) > self._table.saved_size:
            _save_to_disk(self.fingerprint, self.chunks, self.disk_kind)
            self._table.saved_size = len(self.chunks)

    @torch.inference_mode()
    def __call__(self, rows: Sequence[dict]) -> list[Any]:
        new = {r["user_id"]: r["chunk_tokens"] for r in rows if r["user_id"] not in self.entries}
        keys = {uid: [self._chunk_key(t) for t in tokens] for uid, tokens in new.items()}
        missing = {k: t for uid, tokens in new.items() for k, t in zip(keys[uid], tokens, strict=True)
                   if k not in self.chunks}
        if missing:
            self._encode_missing(missing)
        for uid, user_keys in keys.items():
            self.entries[uid] = self._keep([self.chunks[k] for k in user_keys])
        if self.fingerprint:
            self._to_disk(bool(missing))
        return [self.entries[r["user_id"]] for r in rows]


class TokenHiddenCache(TokenChunkCache):
    """user_id -> [(tokens, H) per chunk] hidden states entering block `layer` of a user backbone whose lower
    blocks are frozen, from preprocessed chunk tokens, on first use.

    The training loop's `model.cache_hidden_states` for the user tower (the row twin of HiddenStateCache):
    the lower blocks run once per distinct chunk and process, a step runs only the top blocks. Only real tokens are
    kept (padding is added at the batch), in `dtype` (float16 halves memory); never on disk.
    """

    disk_kind = None

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, layer: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float16, micro_batch: int | None = None):
        super().__init__(encoder, featurizer, device, micro_batch)
        self.layer = layer
        self.dtype = dtype

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> Sequence[np.ndarray]:
        from uue.model.backbone import hidden_states_at

        states = hidden_states_at(self.encoder.backbone, ids, mask, self.layer).to(self.dtype).cpu()
        real = mask.bool().cpu()
        return [chunk[used].numpy() for chunk, used in zip(states, real, strict=True)]

    def _keep(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        return chunks
