"""The user-state store on both backends: SQLite (a file) and a real redis-server on 127.0.0.1.

Compare-and-set writes, training's eviction, no chunk lost under parallel writers (threads, and processes
on one SQLite file / one Redis), model fingerprints never mixed, deletion checked in the backend itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from uue.data.featurize import select_chunk_indices
from uue.serving.user_store import (
    ModelMismatchError,
    RedisUserStore,
    SQLiteUserStore,
    StoredChunk,
    StoreUnavailableError,
    UserState,
    merge_chunks,
    open_user_store,
    text_hash,
    update_user,
)

H = 8


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        opened = open_user_store("sqlite", path=str(tmp_path / "users.sqlite"))
    else:
        url = request.getfixturevalue("redis_url")
        opened = open_user_store("redis", url=url, prefix=f"uue:test:{tmp_path.name}:")
    yield opened
    opened.close()


def _chunk(i: int, timestamp: str | None = None, text: str | None = None) -> StoredChunk:
    vector = np.random.default_rng(i).normal(size=H).astype(np.float32)
    return StoredChunk(-1, vector, timestamp, "forum" if i % 2 else None, text_hash(f"chunk {i}"), text)


def _appender(user_id: str, new: list[StoredChunk], limit: int, fingerprint: str = "fp-current"):
    """A change that appends `new` and re-pools (a mean stands in for the tower's pooling here)."""

    async def change(current: UserState | None) -> UserState:
        if current is not None:
            current.check_model(fingerprint)
        chunks, next_seq = merge_chunks(current, new, limit)
        vector = np.mean([c.vector for c in chunks], axis=0)
        return UserState(user_id, fingerprint, chunks, vector, {"age": 3}, next_seq=next_seq)

    return change


def _append(store, user_id: str, new: list[StoredChunk], limit: int, fingerprint: str = "fp-current") -> UserState:
    return asyncio.run(update_user(store, user_id, _appender(user_id, new, limit, fingerprint)))


def test_round_trip_and_compare_and_set(store):
    written = _append(store, "alice", [_chunk(0, "2025-01-01T00:00:00Z", text="hello"), _chunk(1)], limit=8)
    got = store.get("alice")
    assert got.version == written.version == 1 and got.next_seq == 2 and got.metadata == {"age": 3}
    assert [c.seq for c in got.chunks] == [0, 1] and got.chunks[0].text == "hello" and got.chunks[1].text is None
    assert got.chunks[0].timestamp == "2025-01-01T00:00:00Z" and got.chunks[1].platform == "forum"
    np.testing.assert_array_equal(got.chunks[1].vector, _chunk(1).vector)
    np.testing.assert_array_equal(got.vector, written.vector)
    # A writer holding version 0 (it read before alice existed) loses: nothing changes.
    assert store.write(UserState("alice", "fp-current", [], np.zeros(H, np.float32)), expected_version=0) is False
    assert store.get("alice").version == 1 and len(store.get("alice").chunks) == 2
    assert store.get("nobody") is None and store.delete("nobody") is False
    # Another model's vectors are refused, never pooled with this model's.
    with pytest.raises(ModelMismatchError, match="PUT the user's history again"):
        _append(store, "alice", [_chunk(2)], limit=8, fingerprint="fp-other")
    assert len(store.get("alice").chunks) == 2


def test_eviction_is_trainings_select_chunks_over_the_whole_history(store):
    """Append in batches with shuffled, tied and missing timestamps: the kept chunks are exactly the ones
    select_chunks keeps from the whole history (arrival order breaks ties, untimed chunks go first)."""
    rng = np.random.default_rng(0)
    history = []
    for i in range(40):
        day = int(rng.integers(1, 10))
        history.append(_chunk(i, None if i % 7 == 0 else f"2025-03-{day:02d}T00:00:00Z"))
    position = 0
    for size in (3, 1, 9, 1, 1, 12, 5, 8):
        _append(store, "bob", history[position : position + size], limit=6)
        position += size
    kept = store.get("bob")
    assert kept.next_seq == 40
    expected = select_chunk_indices(history, 6)
    assert [c.seq for c in kept.chunks] == expected
    assert [c.text_hash for c in kept.chunks] == [history[i].text_hash for i in expected]
    np.testing.assert_allclose(kept.vector, np.mean([history[i].vector for i in expected], 0), rtol=1e-6)


def test_concurrent_appends_from_threads_lose_no_chunk(store):
    def worker(w: int) -> None:
        for j in range(5):
            _append(store, "carol", [_chunk(100 * w + j)], limit=64)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    state = store.get("carol")
    assert state.version == 40 and state.next_seq == 40
    assert sorted(c.text_hash for c in state.chunks) == sorted(_chunk(100 * w + j).text_hash
                                                               for w in range(8) for j in range(5))
    # The pooled vector is the one of the stored chunks, not of a writer's stale read.
    np.testing.assert_allclose(state.vector, np.mean([c.vector for c in state.chunks], 0), rtol=1e-6)


def _process_worker(backend: str, where: str, prefix: str, w: int) -> None:
    store = open_user_store(backend, path=where, url=where, prefix=prefix)
    for j in range(6):
        _append(store, "dave", [_chunk(1000 * w + j)], limit=64)
    store.close()


def test_concurrent_appends_from_processes_lose_no_chunk(store):
    where = str(store.path) if isinstance(store, SQLiteUserStore) else store.url
    prefix = getattr(store, "prefix", "")
    # fork: the children start in milliseconds with uue already imported (spawn re-imports torch in each);
    # each opens its own connection (SQLiteUserStore keys connections by process id).
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_process_worker, args=(store.kind, where, prefix, w)) for w in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    state = store.get("dave")
    assert state.version == 18
    assert sorted(c.text_hash for c in state.chunks) == sorted(_chunk(1000 * w + j).text_hash
                                                               for w in range(3) for j in range(6))


def _stored_bytes(store) -> bytes:
    """Everything the backend holds: the SQLite file with its WAL and shared-memory files, or every Redis value."""
    if isinstance(store, SQLiteUserStore):
        files = [store.path.with_name(store.path.name + suffix) for suffix in ("", "-wal", "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())
    assert isinstance(store, RedisUserStore)
    mine = store.client.scan_iter(match=f"{store.prefix}*")  # the server is shared with the other tests
    return b"".join(name + b"".join(k + v for k, v in store.client.hgetall(name).items()) for name in mine)


def test_delete_removes_every_trace_from_the_backend(store):
    secret = [_chunk(i, text=f"erin's private message {i}") for i in range(5)]
    kept = [_chunk(50 + i, text=f"frank's message {i}") for i in range(3)]
    _append(store, "erin-7f3a", secret, limit=8)
    _append(store, "erin-7f3a", [_chunk(9, text="erin again")], limit=8)
    _append(store, "frank-11b2", kept, limit=8)
    before = _stored_bytes(store)
    assert b"erin-7f3a" in before and secret[0].vector.tobytes() in before  # the scan sees what is there
    assert store.delete("erin-7f3a") is True
    after = _stored_bytes(store)
    traces = [b"erin-7f3a", b"erin's private", b"erin again"] + [c.text_hash.encode() for c in secret]
    traces += [c.vector.tobytes() for c in secret]
    assert [t for t in traces if t in after] == []
    assert b"frank-11b2" in after and kept[0].vector.tobytes() in after and store.get("frank-11b2") is not None
    if isinstance(store, RedisUserStore):
        assert [k for k in store.client.scan_iter() if b"erin" in k] == []  # the whole keyspace
    else:
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            rows = [r for table in ("users", "chunks")
                    for r in conn.execute(f"SELECT user_id FROM {table} WHERE user_id LIKE 'erin%'")]
        assert rows == []
    assert store.get("erin-7f3a") is None
    # The id can be used again; it starts a new history.
    assert _append(store, "erin-7f3a", [_chunk(77)], limit=8).next_seq == 1


def _refused_everything(store, within_s: float) -> None:
    """Every call raises StoreUnavailableError (not the backend's own error), each within `within_s`."""
    state = UserState("gus", "fp-current", [], np.zeros(H, np.float32))
    for call in (lambda: store.write(state, 0), lambda: store.delete("gus"), store.ping):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            call()
        assert time.monotonic() - started < within_s


def test_an_unreachable_or_hung_redis_raises_store_unavailable(tmp_path):
    from serving_helpers import RedisServer

    server = RedisServer(tmp_path / "redis")  # not started: connections refused
    store = open_user_store("redis", url=server.url, timeout_s=0.5)  # opens anyway: /health tells
    with pytest.raises(StoreUnavailableError, match="redis ConnectionError"):
        store.get("gus")
    _refused_everything(store, within_s=2)
    server.start()
    _append(store, "gus", [_chunk(1)], limit=8)
    server.pause()  # hung: every call times out
    try:
        with pytest.raises(StoreUnavailableError, match="redis TimeoutError"):
            store.get("gus")
        _refused_everything(store, within_s=2)
    finally:
        server.resume()
    assert len(store.get("gus").chunks) == 1  # the pooled connections recover by themselves
    store.close()
    server.stop()


def test_sqlite_locked_past_its_timeout_raises_store_unavailable_and_reads_go_on(tmp_path):
    import sqlite3

    store = open_user_store("sqlite", path=str(tmp_path / "users.sqlite"), timeout_s=0.3)
    _append(store, "hal", [_chunk(1)], limit=8)
    holder = sqlite3.connect(tmp_path / "users.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(StoreUnavailableError, match="database is locked"):
            _append(store, "hal", [_chunk(2)], limit=8)
        _refused_everything(store, within_s=2)
        assert len(store.get("hal").chunks) == 1  # WAL readers never wait for the writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.ping()
    assert len(_append(store, "hal", [_chunk(2)], limit=8).chunks) == 2
    store.close()


def test_a_sqlite_file_from_before_idempotency_keys_opens_and_keeps_its_users(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema as it was, with one user
        conn.executescript(
            "CREATE TABLE users (user_id TEXT PRIMARY KEY, model_fingerprint TEXT NOT NULL, version INTEGER NOT NULL,"
            " next_seq INTEGER NOT NULL, vector BLOB NOT NULL, metadata TEXT, updated_at REAL NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE chunks (user_id TEXT NOT NULL, seq INTEGER NOT NULL, timestamp TEXT, platform TEXT,"
            " text_hash TEXT NOT NULL, text TEXT, vector BLOB NOT NULL, PRIMARY KEY (user_id, seq)) WITHOUT ROWID;")
        conn.execute("INSERT INTO users VALUES ('ida', 'fp-current', 1, 1, ?, NULL, 0)", (bytes(4 * H),))
    store = open_user_store("sqlite", path=str(path))
    assert store.get("ida").version == 1 and store.get("ida").request_keys == []
    assert _append(store, "ida", [_chunk(3)], limit=8).version == 2
    store.close()
