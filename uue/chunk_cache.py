"""Chunk vectors of a frozen user backbone, computed once per user and reused.

With `model.freeze_user_backbone: true` the backbone maps a chunk to the same vector at every step, so
encoding each user's chunks once and training only what sits above (attention pooling, metadata
fusion, projection) gives the same model as re-encoding every step, at a fraction of the cost: on a
2-core CPU the user backbone is most of the work. `model.cache_chunk_vectors: true` turns this on in
`UUETrainer`; evaluation uses the same cache for frozen-backbone models and the untrained baseline.

Caches are keyed by a fingerprint of the backbone weights and the featurization settings and shared
within a process, so a trainer and a later evaluation of the same frozen backbone encode each user once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from uue.data.featurize import Featurizer, trim_token_columns
from uue.data.schema import UserData
from uue.model.backbone import TextEncoder

_SHARED: dict[str, dict[str, np.ndarray]] = {}


def backbone_fingerprint(encoder: TextEncoder, featurizer: Featurizer) -> str:
    """Hash of the weights and of what decides a chunk's tokens (lengths, tokenizer, pooling)."""
    digest = hashlib.blake2b(digest_size=16)
    cfg = featurizer.config
    digest.update(f"{encoder.pooling}|{cfg.max_chunk_length}|{cfg.num_chunks_per_user}|".encode())
    digest.update(type(featurizer.user_tokenizer).__name__.encode())
    digest.update(str(len(featurizer.user_tokenizer)).encode())
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _user_key(user: UserData) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for chunk in user.chunks:
        digest.update(f"{chunk.platform}\x1f{chunk.timestamp}\x1f{chunk.text}\x1e".encode())
    return f"{user.user_id}:{digest.hexdigest()}"


class ChunkVectorCache:
    """user -> (real chunks, H) vectors of one frozen backbone; `features(user)` pads them for a batch."""

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, device: str | torch.device = "cpu",
                 micro_batch: int | None = None, progress: bool = True):
        self.encoder = encoder
        self.featurizer = featurizer
        self.device = torch.device(device)
        self.micro_batch = micro_batch or featurizer.config.encode_micro_batch
        self.progress = progress
        self.fingerprint = backbone_fingerprint(encoder, featurizer)
        self.vectors = _SHARED.setdefault(self.fingerprint, {})

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @torch.inference_mode()
    def precompute(self, users: Sequence[UserData], desc: str = "chunk vectors") -> int:
        """Encode every not-yet-cached user; chunks of all users are batched together by length."""
        todo = [u for u in {_user_key(u): u for u in users}.items() if u[0] not in self.vectors]
        if not todo:
            return 0
        ids, masks, counts = [], [], []
        for _, user in todo:
            feats = self.featurizer.user_features(user)
            real = int(feats["chunk_mask"].sum())
            ids.append(feats["user_input_ids"][:real])
            masks.append(feats["user_attention_mask"][:real])
            counts.append(real)
        all_ids = torch.as_tensor(np.concatenate(ids))
        all_masks = torch.as_tensor(np.concatenate(masks))
        order = torch.argsort(all_masks.sum(1), descending=True)  # similar lengths share a micro-batch
        out = torch.empty(len(order), self.hidden_size, dtype=torch.float32)
        was_training = self.encoder.training
        self.encoder.eval()
        total = int(all_masks.sum())
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not self.progress) as bar:
            for start in range(0, len(order), self.micro_batch):
                rows = order[start : start + self.micro_batch]
                batch_ids, batch_mask = trim_token_columns(all_ids[rows], all_masks[rows])
                vectors = self.encoder(batch_ids.to(self.device), batch_mask.to(self.device))
                out[rows] = vectors.float().cpu()
                bar.update(int(batch_mask.sum()))
        self.encoder.train(was_training)
        # Rows of `out` follow `todo` order (each user's chunks contiguous): slice them back per user.
        position = 0
        for key, n in zip([k for k, _ in todo], counts, strict=True):
            self.vectors[key] = out[position : position + n].numpy().copy()
            position += n
        return len(todo)

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
    was_training = encoder.training
    encoder.eval()
    vectors = []
    for start in range(0, len(ids), batch_size):
        batch_ids, batch_mask = trim_token_columns(ids[start : start + batch_size], mask[start : start + batch_size])
        vectors.append(encoder(batch_ids.to(device), batch_mask.to(device)).float().cpu())
    encoder.train(was_training)
    out = {"item_text_vectors": torch.cat(vectors).numpy()}
    if "item_metadata" in features:
        out["item_metadata"] = features["item_metadata"]
    return out


class TokenChunkCache:
    """user_id -> (chunks, H) vectors of a frozen user backbone, from preprocessed chunk tokens, on first use.

    The training loop's `model.cache_chunk_vectors`: a user's chunks are encoded the first time one of its
    batches is collated (in one process or a Ray worker alike) and reused in later epochs.
    """

    def __init__(self, encoder: TextEncoder, featurizer: Featurizer, device: str | torch.device = "cpu",
                 micro_batch: int | None = None):
        from uue.data.featurize import pad_sequences

        self._pad = pad_sequences
        self.encoder = encoder
        self.device = torch.device(device)
        self.micro_batch = micro_batch or featurizer.config.encode_micro_batch
        tokenizer = featurizer.user_tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.vectors: dict[str, np.ndarray] = {}

    @torch.inference_mode()
    def __call__(self, rows: Sequence[dict]) -> list[np.ndarray]:
        todo = {r["user_id"]: r["chunk_tokens"] for r in rows if r["user_id"] not in self.vectors}
        if todo:
            chunks = [(uid, t) for uid, tokens in todo.items() for t in tokens]
            order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i][1]))  # similar lengths together
            out = np.empty((len(chunks), self.encoder.hidden_size), dtype=np.float32)
            was_training = self.encoder.training
            self.encoder.eval()
            for start in range(0, len(order), self.micro_batch):
                rows_at = order[start : start + self.micro_batch]
                ids, mask = self._pad([chunks[i][1] for i in rows_at], self.pad_id, self.left)
                vectors = self.encoder(torch.as_tensor(ids, device=self.device),
                                       torch.as_tensor(mask, device=self.device))
                out[rows_at] = vectors.float().cpu().numpy()
            self.encoder.train(was_training)
            position = 0
            for uid, tokens in todo.items():
                self.vectors[uid] = out[position : position + len(tokens)].copy()
                position += len(tokens)
        return [self.vectors[r["user_id"]] for r in rows]
