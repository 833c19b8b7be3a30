"""Stored users: what the `/users/...` routes, and `user_id` in /score, /retrieve and /v1/embeddings, call.

A history is encoded once: `put` encodes the kept chunks, `append` only the new ones, and both re-pool the
user vector from the stored chunk vectors with the user tower's own pooling (`UserEncoder.pool`), so an
appended user's vector equals encoding its whole history from scratch. Explanations re-pool too: a
chunk's contribution to a statement's score is the score minus the score of the same user without that
chunk (leave-one-out over the stored chunk vectors; no chunk is re-encoded).

Why leave-one-out and not "pooling weight x chunk similarity": the user vector passes LayerNorm, metadata
fusion, a projection and L2 normalisation after pooling, so an attention weight times a chunk's raw
similarity is not what the model computes. Removing the chunk and re-pooling is: it answers "how much
lower would this statement score without this message" exactly, for attention and mean pooling alike,
at the cost of one pooling pass over C users of C-1 chunks (cheap next to encoding one chunk). Two
near-identical chunks share credit (each alone is redundant); the response says it is leave-one-out.

A store that does not answer raises `StoreUnavailableError`, which the HTTP app turns into 503 with
`Retry-After`. An append may carry an idempotency key: the key is written with the chunks in one atomic
write, so a retry (after a 503 whose write may have landed, or a lost reply) finds it and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from uue.data.featurize import select_chunk_indices
from uue.data.schema import UserChunk, UserData
from uue.serving.api import RequestError
from uue.serving.auth import ApiKeys
from uue.serving.settings import UserStoreArgs
from uue.serving.user_store import (
    ModelMismatchError,
    StoreConflictError,
    StoredChunk,
    StoreUnavailableError,
    UserState,
    UserStore,
    merge_chunks,
    open_user_store,
    text_hash,
    update_user,
    with_request_key,
)

logger = logging.getLogger("ray.serve")


class ChunkBackend(Protocol):
    """The user tower split at the chunk vectors (in-process encoders or the UserTower deployment)."""

    async def pool_users(self, users: list[tuple[np.ndarray, dict | None]]) -> np.ndarray: ...

    async def leave_one_out(self, vectors: np.ndarray, metadata: dict | None) -> np.ndarray: ...

    async def encode_and_pool(self, chunks: list[UserChunk], stored: np.ndarray | None, kept_new: list[int],
                              metadata: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """Encode `chunks`; pool `stored` followed by the encoded chunks at `kept_new`: (N, H) vectors, (D,) user."""


@dataclass
class ChunkContribution:
    index: int
    """Position of the chunk in the user's history: the request's `chunks` list for a user sent inline, the
    chunk list `GET /users/{id}` shows for a stored user."""
    seq: int | None
    timestamp: str | None
    platform: str | None
    contribution: float
    """The statement's score minus its score without this chunk (leave-one-out)."""


@dataclass
class PooledUser:
    """A user ready to score: its vector, and the chunk vectors behind it for explanations."""

    vector: np.ndarray
    chunk_vectors: np.ndarray
    metadata: dict | None
    positions: list[int]
    chunks: list[StoredChunk | UserChunk]


class UserService:
    """Put/append/get/delete stored users and explain scores, over one store and one user tower."""

    def __init__(self, store: UserStore, backend: ChunkBackend, model_fingerprint: str, num_chunks_per_user: int,
                 store_text: bool = False, hash_key: bytes | None = None):
        self.store, self.backend = store, backend
        self.model_fingerprint = model_fingerprint
        self.limit = num_chunks_per_user
        self.store_text, self.hash_key = store_text, hash_key

    def _records(self, chunks: list[UserChunk]) -> list[StoredChunk]:
        """New chunks as store records; their vectors are filled in once encoded."""
        return [StoredChunk(-1, None, c.timestamp, c.platform, text_hash(c.text, self.hash_key),  # type: ignore[arg-type]
                            c.text if self.store_text else None)
                for c in chunks]

    async def _write(self, user_id: str, new: list[UserChunk], metadata: dict | None, replace_all: bool,
                     keep_metadata: bool, request_key: str | None = None, digest: str = "") -> UserState:
        records = self._records(new)
        encoded: np.ndarray | None = None  # vectors of `new`: encoded once, on the first attempt
        replayed = False

        async def change(current: UserState | None) -> UserState:
            nonlocal encoded, replayed
            if request_key is not None and current is not None:
                applied = current.request_digest(request_key)
                replayed = applied == digest
                if replayed:  # this request landed before (its answer was lost): write nothing
                    return current
                if applied is not None:
                    raise RequestError(422, f"Idempotency-Key {request_key!r} was used for another request to "
                                            f"user {user_id!r}: send a new key for a new request", "Idempotency-Key")
            if current is not None and not replace_all:
                current.check_model(self.model_fingerprint)  # never pool two models' vectors together
            base = current
            if current is not None and replace_all:  # fresh history, arrival numbers still never reused
                base = UserState(user_id, self.model_fingerprint, [], current.vector, next_seq=current.next_seq,
                                 request_keys=current.request_keys)
            first_new = base.next_seq if base else 0
            chunks, next_seq = merge_chunks(base, records, self.limit)  # which chunks stay depends on timestamps only
            meta = current.metadata if keep_metadata and current is not None else metadata
            if encoded is None:
                # One user-tower call: encode the new chunks and pool them with the kept stored vectors.
                stored = [c.vector for c in chunks if c.seq < first_new]
                kept_new = [c.seq - first_new for c in chunks if c.seq >= first_new]
                encoded, vector = await self.backend.encode_and_pool(
                    new, np.stack(stored) if stored else None, kept_new, meta)
                chunks = [replace(c, vector=encoded[c.seq - first_new]) if c.seq >= first_new else c
                          for c in chunks]
            else:  # a retry after a concurrent write: the new chunks are encoded already, only pool again
                chunks = [replace(c, vector=encoded[c.seq - first_new]) if c.seq >= first_new else c
                          for c in chunks]
                vector = (await self.backend.pool_users([(np.stack([c.vector for c in chunks]), meta)]))[0]
            return UserState(user_id, self.model_fingerprint, chunks, vector, meta, next_seq=next_seq,
                             updated_at=time.time(), request_keys=with_request_key(base, request_key, digest))

        try:
            state = await update_user(self.store, user_id, change)
            return replace(state, replayed=True) if replayed else state
        except ModelMismatchError as err:
            raise RequestError(409, str(err), "user_id") from None
        except StoreConflictError as err:
            raise RequestError(409, str(err), "user_id") from None

    async def put(self, user_id: str, user: UserData) -> UserState:
        """Replace the user's whole history (the kept `num_chunks_per_user` chunks are encoded)."""
        kept = [user.chunks[i] for i in select_chunk_indices(user.chunks, self.limit)]
        return await self._write(user_id, kept, user.metadata, replace_all=True, keep_metadata=False)

    async def append(self, user_id: str, chunks: list[UserChunk], metadata: dict | None = None,
                     request_key: str | None = None) -> UserState:
        """Add chunks to the user's history (creating the user if new): only they are encoded; the oldest
        chunks beyond `num_chunks_per_user` are evicted as training's `select_chunks` would.
        `metadata` replaces the stored metadata when given. With `request_key` (the client's Idempotency-Key)
        an append whose key landed already writes nothing and answers the stored user (`replayed`); the same
        key with other chunks or metadata is refused (422)."""
        # New chunks that cannot survive among the new ones alone cannot survive the merge either.
        new = [chunks[i] for i in select_chunk_indices(chunks, self.limit)]
        request = json.dumps([[c.text, c.platform, c.timestamp] for c in chunks] + [metadata], sort_keys=True)
        return await self._write(user_id, new, metadata, replace_all=False, keep_metadata=metadata is None,
                                 request_key=request_key, digest=text_hash(request, self.hash_key))

    async def get(self, user_id: str) -> UserState:
        state = await asyncio.to_thread(self.store.get, user_id)
        if state is None:
            raise RequestError(404, f"user {user_id!r} is not stored (PUT /users/{{user_id}} first)", "user_id")
        try:
            state.check_model(self.model_fingerprint)
        except ModelMismatchError as err:
            raise RequestError(409, str(err), "user_id") from None
        return state

    async def delete(self, user_id: str) -> bool:
        return await asyncio.to_thread(self.store.delete, user_id)

    async def health(self) -> dict[str, Any]:
        """Whether the store would take a write now (`/health`): {backend, available, error}."""
        try:
            await asyncio.to_thread(self.store.ping)
        except StoreUnavailableError as err:
            return {"backend": self.store.kind, "available": False, "error": str(err)}
        return {"backend": self.store.kind, "available": True, "error": None}

    # ------------------------------------------------------------------ scoring inputs
    async def stored(self, user_id: str) -> PooledUser:
        state = await self.get(user_id)
        return PooledUser(state.vector, np.stack([c.vector for c in state.chunks]), state.metadata,
                          list(range(len(state.chunks))), list(state.chunks))

    async def inline(self, user: UserData) -> PooledUser:
        return await inline_user(self.backend, user, self.limit)

    async def explain(self, user: PooledUser, statement_vectors: np.ndarray, top: int) -> list[list[ChunkContribution]]:
        return await explain_scores(self.backend, user, statement_vectors, top)


async def inline_user(backend: ChunkBackend, user: UserData, limit: int) -> PooledUser:
    """A user sent in the request, encoded through the split path so its chunk vectors are at hand for the
    explanation (the vector equals the plain user encoding)."""
    positions = select_chunk_indices(user.chunks, limit)
    kept = [user.chunks[i] for i in positions]
    vectors, vector = await backend.encode_and_pool(kept, None, list(range(len(kept))), user.metadata)
    return PooledUser(vector, vectors, user.metadata, positions, kept)


async def explain_scores(backend: ChunkBackend, user: PooledUser, statement_vectors: np.ndarray,
                         top: int) -> list[list[ChunkContribution]]:
    """Per statement, the `top` chunks whose removal lowers its score most, largest first."""
    without = await backend.leave_one_out(user.chunk_vectors, user.metadata)  # (C, D)
    statements = statement_vectors.astype(np.float32)
    full = statements @ user.vector.astype(np.float32)  # (S,)
    contributions = full[:, None] - statements @ without.astype(np.float32).T  # (S, C)
    out = []
    for row in contributions:
        order = np.argsort(-row, kind="stable")[:top]
        out.append([ChunkContribution(
            index=user.positions[c], seq=getattr(user.chunks[c], "seq", None),
            timestamp=user.chunks[c].timestamp, platform=user.chunks[c].platform, contribution=float(row[c]),
        ) for c in order])
    return out


def open_user_service(args: UserStoreArgs, backend: ChunkBackend, model_fingerprint: str,
                      num_chunks_per_user: int) -> tuple[UserService, ApiKeys]:
    """The configured store (secrets from the environment) and the API keys that guard it."""
    url = os.environ.get(args.url_env) or args.url
    store = open_user_store(args.backend, path=args.path, url=url, prefix=args.key_prefix, timeout_s=args.timeout_s)
    try:
        store.ping()
    except StoreUnavailableError as err:  # serve the towers meanwhile; /health says the store is down
        logger.warning("user store unavailable at start (%s): stored-user requests get 503 until it answers", err)
    hash_key = os.environ.get(args.text_hash_key_env)
    service = UserService(store, backend, model_fingerprint, num_chunks_per_user, store_text=args.store_text,
                          hash_key=hash_key.encode("utf-8") if hash_key else None)
    return service, ApiKeys.from_env(args.api_keys_env)
