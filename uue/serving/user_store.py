"""Per-user state kept between requests, so a new message costs one chunk's encoding, not the whole history's.

For each user id the store holds what the user tower needs to re-pool without re-encoding:

- every kept chunk's encoder vector (the user tower's input to pooling), its timestamp, platform, an
  arrival number (`seq`) and a keyed hash of its text; the text itself only when `store_text` is on;
- the user's metadata (the tower fuses it after pooling) and the pooled user vector;
- the model fingerprint the vectors were computed with. Vectors of one model are never pooled with another
  model's: a state written by another fingerprint is *refused* (`ModelMismatchError`: the caller answers
  409 and the client PUTs the history again, which replaces it). Recomputing is impossible in general,
  since the texts are not kept.

Two backends behind one interface: `SQLiteUserStore` (one file, WAL mode; the embedded default for one
node) and `RedisUserStore` (a networked server shared by every replica on every node). Writes are
compare-and-set on a per-user version (`write(state, expected_version)`); `update_user` is the one
read-change-write loop on top, retried on conflict, so concurrent appends to one user lose no chunk.
Eviction is training's: the `num_chunks_per_user` most recent chunks by `select_chunk_indices`.
Deletion removes every stored trace (see each backend's `delete`).

A backend that cannot answer (Redis down or too slow, SQLite's write lock held past the store's `timeout_s`)
raises `StoreUnavailableError` from every method: the HTTP layer answers 503 with `Retry-After`, never 500,
and `ping` tells `/health` whether the store answers now. A write that raised is never acknowledged; its
append may still have landed (the reply was lost), which is why an append may carry an idempotency key
(`UserState.request_keys`): it is written in the same atomic record as the chunks, so a retry finds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from uue.data.featurize import select_chunk_indices

VECTOR_DTYPE = np.dtype("<f4")
DEFAULT_TIMEOUT_S = 5.0
"""How long one store call may wait (Redis connect or reply, SQLite's write lock) before it is a failure."""
PROBE_TIMEOUT_S = 1.0
"""How long `/health`'s probe waits: a load balancer's probe gives up after about a second."""
REQUEST_KEYS_KEPT = 100
"""Idempotency keys kept per user: a retry must come before this many later keyed appends to the same user."""


class ModelMismatchError(ValueError):
    """A stored user whose vectors come from another model than the one serving."""


class StoreConflictError(RuntimeError):
    """A user updated by so many concurrent writers that this write kept losing the race."""


class StoreUnavailableError(RuntimeError):
    """The backend did not answer (down, timed out, locked): the request may be retried later. A write that
    raised it may or may not have landed."""


@dataclass(frozen=True)
class StoredChunk:
    seq: int
    """Arrival number within the user (0, 1, 2, ...): the history order, which breaks timestamp ties."""
    vector: np.ndarray
    timestamp: str | None
    platform: str | None
    text_hash: str
    text: str | None = None


@dataclass
class UserState:
    user_id: str
    model_fingerprint: str
    chunks: list[StoredChunk]
    """Kept chunks in history (seq) order."""
    vector: np.ndarray
    metadata: dict[str, Any] | None = None
    version: int = 0
    """Bumped by every write; 0 means not stored."""
    next_seq: int = 0
    updated_at: float = field(default_factory=time.time)
    request_keys: list[tuple[str, str]] = field(default_factory=list)
    """(idempotency key, digest of the request) of the latest keyed appends, oldest first (at most
    `REQUEST_KEYS_KEPT`): stored with the chunks in one write, so "the key is here" means "it landed"."""
    replayed: bool = False
    """Set on the answer to a retried append whose key had landed already (nothing was written); not stored."""

    def request_digest(self, key: str) -> str | None:
        """The digest of the request that applied idempotency key `key`; None if no kept request did."""
        return next((digest for kept, digest in self.request_keys if kept == key), None)

    def check_model(self, fingerprint: str) -> None:
        if self.model_fingerprint != fingerprint:
            raise ModelMismatchError(
                f"user {self.user_id!r} was stored with model {self.model_fingerprint[:12]}, this server runs "
                f"{fingerprint[:12]}: PUT the user's history again to recompute it with this model"
            )


def with_request_key(current: UserState | None, key: str | None, digest: str) -> list[tuple[str, str]]:
    """The idempotency keys to store with the write of a request (`key` None: a request without one)."""
    kept = (current.request_keys if current else []) + ([(key, digest)] if key is not None else [])
    return kept[-REQUEST_KEYS_KEPT:]


def text_hash(text: str, key: bytes | None = None) -> str:
    """blake2b-128 of a chunk's text, keyed when a key is configured (an unkeyed hash of a short text can be
    guessed by hashing candidates; a keyed one cannot without the key)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16, key=key or b"").hexdigest()


def merge_chunks(current: UserState | None, new: Sequence[StoredChunk], limit: int) -> tuple[list[StoredChunk], int]:
    """Stored chunks + new ones (numbered from `next_seq` in arrival order) -> the `limit` kept, next seq.

    The same selection as training's `select_chunks` over the whole history in arrival order: the most
    recent `limit` of the kept chunks and the new ones are the most recent `limit` of everything."""
    start = current.next_seq if current else 0
    numbered = [replace(c, seq=start + i) for i, c in enumerate(new)]
    history = (current.chunks if current else []) + numbered
    return [history[i] for i in select_chunk_indices(history, limit)], start + len(numbered)


class UserStore(ABC):
    """Per-user states with compare-and-set writes; thread-safe, and safe across processes.

    Every public method raises `StoreUnavailableError` for the backend's own failures (`failures`), so
    callers handle one exception whatever the backend; backends implement the underscored methods."""

    kind: str
    failures: tuple[type[BaseException], ...] = ()
    """The backend's exceptions that mean "cannot answer now" (connection, timeout, lock)."""

    @contextmanager
    def _answering(self) -> Iterator[None]:
        try:
            yield
        except self.failures as err:
            raise StoreUnavailableError(f"{self.kind} {type(err).__name__}: {err}") from err

    def get(self, user_id: str) -> UserState | None:
        with self._answering():
            return self._get(user_id)

    def write(self, state: UserState, expected_version: int) -> bool:
        """Store `state` as version `expected_version + 1` iff the stored version is still `expected_version`
        (0: the user is not stored); False, changing nothing, when another writer got there first."""
        with self._answering():
            return self._write(state, expected_version)

    def delete(self, user_id: str) -> bool:
        """Remove every stored trace of the user; True if it was stored."""
        with self._answering():
            return self._delete(user_id)

    def ping(self) -> None:
        """Raise `StoreUnavailableError` unless the store would take a write now (within `PROBE_TIMEOUT_S`)."""
        with self._answering():
            self._ping()

    @abstractmethod
    def _get(self, user_id: str) -> UserState | None: ...

    @abstractmethod
    def _write(self, state: UserState, expected_version: int) -> bool: ...

    @abstractmethod
    def _delete(self, user_id: str) -> bool: ...

    @abstractmethod
    def _ping(self) -> None: ...

    def close(self) -> None:  # noqa: B027 (optional for a backend)
        pass

    def info(self) -> dict[str, Any]:
        return {"backend": self.kind}


async def update_user(
    store: UserStore, user_id: str, change: Callable[[UserState | None], Awaitable[UserState]],
    attempts: int = 100,
) -> UserState:
    """Read the user, `change` it (may pool on a remote replica: no lock is held meanwhile), write it back iff
    nobody wrote in between; else read again and redo. The one read-change-write loop of every backend.
    A `change` that returns `current` itself writes nothing (a retried request that had landed)."""
    for attempt in range(attempts):
        current = await asyncio.to_thread(store.get, user_id)
        new = await change(current)
        if current is not None and new is current:
            return current
        expected = current.version if current else 0
        if await asyncio.to_thread(store.write, new, expected):
            return replace(new, version=expected + 1)
        await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 10))))
    raise StoreConflictError(f"user {user_id!r}: {attempts} concurrent writes won the race over this one; retry")


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def _vector(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=VECTOR_DTYPE).copy()


# ---------------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, model_fingerprint TEXT NOT NULL, version INTEGER NOT NULL,
    next_seq INTEGER NOT NULL, vector BLOB NOT NULL, metadata TEXT, updated_at REAL NOT NULL, request_keys TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    user_id TEXT NOT NULL, seq INTEGER NOT NULL, timestamp TEXT, platform TEXT, text_hash TEXT NOT NULL,
    text TEXT, vector BLOB NOT NULL, PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
"""


class SQLiteUserStore(UserStore):
    """One SQLite file in WAL mode: readers never block the writer; `BEGIN IMMEDIATE` serialises writers
    across threads and processes (every ingress replica on one node may share the file; not across nodes:
    use Redis there). `secure_delete` zeroes deleted rows, and a delete checkpoints and truncates the WAL,
    so no page of a deleted user survives in the database or its WAL file."""

    kind = "sqlite"
    failures = (sqlite3.OperationalError,)  # locked or busy past timeout_s, disk I/O, disk full, cannot open

    def __init__(self, path: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = Path(str(path).removeprefix("sqlite://"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        if "request_keys" not in {row[1] for row in conn.execute("PRAGMA table_info(users)")}:
            try:  # a file written before idempotency keys existed
                conn.execute("ALTER TABLE users ADD COLUMN request_keys TEXT")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise

    def _conn(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps the file consistent
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all.append(conn)
        return conn

    def _get(self, user_id: str) -> UserState | None:
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for both tables
        try:
            row = conn.execute("SELECT model_fingerprint, version, next_seq, vector, metadata, updated_at, "
                               "request_keys FROM users WHERE user_id = ?", (user_id,)).fetchone()
            chunks = conn.execute("SELECT seq, vector, timestamp, platform, text_hash, text FROM chunks "
                                  "WHERE user_id = ? ORDER BY seq", (user_id,)).fetchall() if row else []
        finally:
            conn.execute("COMMIT")
        if row is None:
            return None
        fingerprint, version, next_seq, vector, metadata, updated_at, request_keys = row
        return UserState(
            user_id=user_id, model_fingerprint=fingerprint, version=version, next_seq=next_seq,
            vector=_vector(vector), metadata=json.loads(metadata) if metadata else None, updated_at=updated_at,
            request_keys=[tuple(pair) for pair in json.loads(request_keys or "[]")],
            chunks=[StoredChunk(seq, _vector(v), ts, platform, digest, text)
                    for seq, v, ts, platform, digest, text in chunks],
        )

    def _write(self, state: UserState, expected_version: int) -> bool:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # the write lock, taken before reading the version
        try:
            row = conn.execute("SELECT version FROM users WHERE user_id = ?", (state.user_id,)).fetchone()
            if (row[0] if row else 0) != expected_version:
                conn.execute("ROLLBACK")
                return False
            stored = {seq for (seq,) in conn.execute("SELECT seq FROM chunks WHERE user_id = ?", (state.user_id,))}
            kept = {c.seq for c in state.chunks}
            conn.executemany("DELETE FROM chunks WHERE user_id = ? AND seq = ?",
                             [(state.user_id, seq) for seq in stored - kept])
            conn.executemany(
                "INSERT INTO chunks (user_id, seq, timestamp, platform, text_hash, text, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(state.user_id, c.seq, c.timestamp, c.platform, c.text_hash, c.text, _vector_bytes(c.vector))
                 for c in state.chunks if c.seq not in stored],
            )
            conn.execute(
                "INSERT OR REPLACE INTO users (user_id, model_fingerprint, version, next_seq, vector, metadata, "
                "updated_at, request_keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (state.user_id, state.model_fingerprint, expected_version + 1, state.next_seq,
                 _vector_bytes(state.vector), json.dumps(state.metadata) if state.metadata is not None else None,
                 state.updated_at, json.dumps(state.request_keys)),
            )
            conn.execute("COMMIT")
            return True
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _delete(self, user_id: str) -> bool:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM chunks WHERE user_id = ?", (user_id,))
            existed = conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount > 0
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.purge_wal()
        return existed

    def _ping(self) -> None:
        """Take and release the write lock, waiting at most `PROBE_TIMEOUT_S` (readers never block in WAL mode,
        so only this says whether a write would get through)."""
        conn = self._conn()
        conn.execute(f"PRAGMA busy_timeout = {int(min(PROBE_TIMEOUT_S, self.timeout_s) * 1000)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")

    def purge_wal(self, attempts: int = 50) -> bool:
        """Copy the WAL into the (zeroed) database pages and truncate it to 0 bytes: the old page images
        a WAL holds are what would otherwise keep a deleted user's rows on disk. Retried while a reader
        holds an old snapshot; False if one still did."""
        for _ in range(attempts):
            busy, _, _ = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def info(self) -> dict[str, Any]:
        return {"backend": self.kind, "path": str(self.path)}


# ---------------------------------------------------------------------------- Redis
class RedisUserStore(UserStore):
    """A Redis server shared by every ingress replica: one hash per user (`<prefix>{<user_id>}`: the braces
    keep a user in one slot of a Redis Cluster) with fields `meta` (JSON), `vector`, and `c:<seq>` per
    chunk. Compare-and-set is WATCH/MULTI/EXEC on that one key; DEL of it deletes every trace."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "uue:user:", timeout_s: float = DEFAULT_TIMEOUT_S):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.failures = (redis.RedisError,)  # connection refused or reset, timeout, LOADING, READONLY, OOM, ...
        self.url, self.prefix = url, prefix

        def client(timeout: float) -> redis.Redis:
            # One attempt per call (redis-py retries 3 times by default): a client retrying after a 503 is
            # bounded; a dropped pooled connection is still replaced before use.
            return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        retry=Retry(NoBackoff(), 0))

        self.client = client(timeout_s)
        self._probe = client(min(PROBE_TIMEOUT_S, timeout_s))

    def key(self, user_id: str) -> str:
        return f"{self.prefix}{{{user_id}}}"

    @staticmethod
    def _pack(chunk: StoredChunk) -> bytes:
        header = json.dumps({"t": chunk.timestamp, "p": chunk.platform, "h": chunk.text_hash, "x": chunk.text})
        head = header.encode("utf-8")
        return len(head).to_bytes(4, "little") + head + _vector_bytes(chunk.vector)

    @staticmethod
    def _unpack(seq: int, raw: bytes) -> StoredChunk:
        n = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4 : 4 + n])
        return StoredChunk(seq, _vector(raw[4 + n :]), header["t"], header["p"], header["h"], header["x"])

    def _get(self, user_id: str) -> UserState | None:
        fields = self.client.hgetall(self.key(user_id))
        if b"meta" not in fields:
            return None
        meta = json.loads(fields[b"meta"])
        chunks = sorted((self._unpack(int(name[2:]), raw) for name, raw in fields.items() if name.startswith(b"c:")),
                        key=lambda c: c.seq)
        return UserState(
            user_id=user_id, model_fingerprint=meta["model_fingerprint"], version=meta["version"],
            next_seq=meta["next_seq"], metadata=meta["metadata"], updated_at=meta["updated_at"],
            vector=_vector(fields[b"vector"]), chunks=chunks,
            request_keys=[tuple(pair) for pair in meta.get("request_keys", [])],
        )

    def _write(self, state: UserState, expected_version: int) -> bool:
        key = self.key(state.user_id)
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.hget(key, "meta")
                if (json.loads(raw)["version"] if raw else 0) != expected_version:
                    pipe.unwatch()
                    return False
                stored = {int(name[2:]) for name in pipe.hkeys(key) if name.startswith(b"c:")}
                kept = {c.seq for c in state.chunks}
                meta = {"model_fingerprint": state.model_fingerprint, "version": expected_version + 1,
                        "next_seq": state.next_seq, "metadata": state.metadata, "updated_at": state.updated_at,
                        "request_keys": state.request_keys}
                mapping: dict[str, bytes] = {f"c:{c.seq}": self._pack(c) for c in state.chunks if c.seq not in stored}
                mapping["meta"] = json.dumps(meta).encode("utf-8")
                mapping["vector"] = _vector_bytes(state.vector)
                pipe.multi()
                if stored - kept:
                    pipe.hdel(key, *[f"c:{seq}" for seq in sorted(stored - kept)])
                pipe.hset(key, mapping=mapping)
                pipe.execute()
                return True
            except self._redis.WatchError:  # another writer, or the connection dropped while watching
                return False

    def _delete(self, user_id: str) -> bool:
        return bool(self.client.delete(self.key(user_id)))

    def _ping(self) -> None:
        self._probe.ping()

    def close(self) -> None:
        self.client.close()
        self._probe.close()

    def info(self) -> dict[str, Any]:
        return {"backend": self.kind, "prefix": self.prefix}


def open_user_store(backend: str, path: str | None = None, url: str | None = None,
                    prefix: str = "uue:user:", timeout_s: float = DEFAULT_TIMEOUT_S) -> UserStore:
    """The configured backend: "sqlite" (a file `path`) or "redis" (a server `url`, redis://host:port/db).

    A Redis that does not answer yet is no reason to fail: the store opens, its calls raise
    `StoreUnavailableError` until the server is back (`/health` says so meanwhile)."""
    if backend == "sqlite":
        if not path:
            raise ValueError("user_store.backend sqlite needs user_store.path (a file)")
        return SQLiteUserStore(path, timeout_s=timeout_s)
    if backend == "redis":
        if not url:
            raise ValueError("user_store.backend redis needs a URL (user_store.url or the env var in url_env)")
        return RedisUserStore(url, prefix=prefix, timeout_s=timeout_s)
    raise ValueError(f"user_store.backend: unknown backend {backend!r} (sqlite or redis)")
