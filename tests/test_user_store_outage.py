"""When the user store fails, over real HTTP on 127.0.0.1 (the in-process app under uvicorn): a real
redis-server frozen (SIGSTOP) and killed (SIGKILL, then started again on the same port) under load, a write
whose reply is lost, SQLite's write lock held past the store's timeout.

Every stored-user request then answers 503 in the OpenAI error shape with Retry-After (never 500), `/health`
says `degraded` while the tower routes keep serving, and no acknowledged append is lost or doubled: clients
retry a 503 with the same Idempotency-Key until it is acknowledged.
"""

from __future__ import annotations

import collections
import threading
import time

import httpx
import numpy as np
import pytest
from serving_helpers import RedisServer, save_tiny_model, serving

from uue.serving.settings import UserStoreArgs

KEY = "outage-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USERS = ["ann", "bob", "cy"]
CLIENTS_PER_USER = 2
MESSAGES_PER_CLIENT = 40
LIMIT = CLIENTS_PER_USER * MESSAGES_PER_CLIENT  # every chunk stays: nothing is evicted, so all must be there


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("outage") / "model", num_chunks_per_user=LIMIT)


@pytest.fixture
def api_keys(monkeypatch):
    monkeypatch.setenv("UUE_OUTAGE_API_KEYS", KEY)
    return "UUE_OUTAGE_API_KEYS"


def _app(model_dir, api_keys: str, **store):
    from uue.serving.local import build_local_app

    return build_local_app(model_dir, user_store=UserStoreArgs(api_keys_env=api_keys, store_text=True, **store))


def _is_503_with_retry_after(response: httpx.Response) -> bool:
    error = response.json().get("error", {})
    return (response.status_code == 503 and response.headers.get("retry-after") == "5"
            and error.get("type") == "server_error" and "user store is unavailable" in error.get("message", ""))


class Client(threading.Thread):
    """Appends its messages one by one, each with its own Idempotency-Key, retrying a 503 until acknowledged."""

    def __init__(self, url: str, name: str, user: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.name, self.user, self.stop = url, name, user, stop
        self.acknowledged: list[str] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.bad: list[str] = []
        self.replayed = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for i in range(MESSAGES_PER_CLIENT):
                if self.stop.is_set():
                    return
                text = f"{self.name} says message {i}"
                while True:  # the same key on every attempt: a retry of a write that landed appends nothing
                    response = http.post(f"/users/{self.user}/chunks", json={"chunks": [text]},
                                         headers={**AUTH, "Idempotency-Key": f"{self.name}-{i}"})
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        self.acknowledged.append(text)
                        self.replayed += response.headers.get("idempotent-replayed") == "true"
                        break
                    if not _is_503_with_retry_after(response):
                        self.bad.append(f"{response.status_code} {response.headers} {response.text}")
                        return
                    time.sleep(0.05)  # a test client; a real one waits Retry-After seconds
                time.sleep(0.02)


def _watch(url: str, stop: threading.Event, seen: dict[str, collections.Counter]) -> None:
    """Meanwhile: /health's status, a tower route, and reading a stored user."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            seen["health"][http.get("/health").json()["status"]] += 1
            seen["statements"][http.post("/embed/statements", json={"statements": ["likes jazz"]}).status_code] += 1
            read = http.get("/users/ann", headers=AUTH)
            seen["read"][read.status_code if read.status_code != 503 or _is_503_with_retry_after(read) else -1] += 1
            time.sleep(0.1)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_redis_frozen_then_killed_under_load_answers_503_and_keeps_every_acknowledged_append(
        tmp_path, model_dir, api_keys):
    from uue.serving.user_store import open_user_store

    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    app = _app(model_dir, api_keys, backend="redis", url=redis.url, timeout_s=0.5)
    stop, watch_stop = threading.Event(), threading.Event()
    seen = {kind: collections.Counter() for kind in ("health", "statements", "read")}
    try:
        with serving(app) as url:
            clients = [Client(url, f"client{u}{c}", user, stop) for u, user in enumerate(USERS)
                       for c in range(CLIENTS_PER_USER)]
            watcher = threading.Thread(target=_watch, args=(url, watch_stop, seen), daemon=True)
            for thread in [*clients, watcher]:
                thread.start()

            def acknowledged() -> int:
                return sum(len(c.acknowledged) for c in clients)

            _wait_for(lambda: all(len(c.acknowledged) >= 2 for c in clients), 60, "appends before the outage")
            redis.pause()  # hung: calls time out after timeout_s
            paused_at = acknowledged()
            time.sleep(2.5)
            redis.resume()
            _wait_for(lambda: acknowledged() >= paused_at + 6, 60, "appends after SIGCONT")
            redis.kill()  # down: connections refused; the append-only file keeps every acknowledged write
            time.sleep(1.5)
            redis.start()
            restarted_at = acknowledged()
            _wait_for(lambda: acknowledged() >= restarted_at + 12, 60, "appends after the restart")
            stop.set()
            for client in clients:
                client.join(timeout=60)
            watch_stop.set()
            watcher.join(timeout=30)
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        redis.kill()
    statuses = sum((c.statuses for c in clients), collections.Counter())
    print(f"outage: appends {dict(statuses)}, replayed {sum(c.replayed for c in clients)}, watched {seen}")
    assert [bad for c in clients for bad in c.bad] == []
    assert set(statuses) == {200, 503} and statuses[503] >= 6
    assert seen["statements"] == {200: sum(seen["statements"].values())}  # the towers served throughout
    assert seen["health"]["degraded"] >= 1 and seen["health"]["ok"] >= 1
    # Reads: served (404 before ann's first append), or 503 with Retry-After; never 500 (-1: a 503 without it).
    assert set(seen["read"]) <= {200, 404, 503} and seen["read"][503] >= 1
    # Every acknowledged append is stored, none twice, nothing that was not acknowledged.
    redis.start()
    store = open_user_store("redis", url=redis.url)
    try:
        for user in USERS:
            stored = collections.Counter(c.text for c in store.get(user).chunks)
            sent = collections.Counter(text for c in clients if c.user == user for text in c.acknowledged)
            assert stored == sent, (user, stored - sent, sent - stored)
    finally:
        store.close()
        redis.kill()


def test_a_retry_after_a_lost_reply_finds_its_key_and_appends_nothing(tmp_path, model_dir, api_keys):
    """The write lands but its reply is lost (the connection drops after EXEC): the client gets 503, not an
    acknowledgement; the retry with the same Idempotency-Key answers the stored user, marked replayed."""
    from uue.model.folder import checkpoint_fingerprint
    from uue.serving.auth import ApiKeys
    from uue.serving.http import ServingService, build_http_app
    from uue.serving.local import InProcessBackend
    from uue.serving.settings import RequestLimits
    from uue.serving.user_store import RedisUserStore
    from uue.serving.users import UserService

    class ReplyLost(RedisUserStore):
        """The real store, but the next armed write's reply never arrives."""

        armed = False

        def _write(self, state, expected_version):
            written = super()._write(state, expected_version)
            if self.armed:
                self.armed = False
                raise self._redis.ConnectionError("Connection closed by server.")
            return written

    redis = RedisServer(tmp_path / "redis").start()
    store = ReplyLost(redis.url, prefix="lost:")
    backend = InProcessBackend(model_dir, device="cpu")
    fingerprint = checkpoint_fingerprint(model_dir)
    service = ServingService(backend=backend, model_fingerprint=fingerprint, dimension=backend.users.dimension,
                             limits=RequestLimits(), retry_after_s=5,
                             users=UserService(store, backend, fingerprint, LIMIT, store_text=True),
                             api_keys=ApiKeys.parse(KEY))
    try:
        with serving(build_http_app(service)) as url, httpx.Client(base_url=url, timeout=30) as http:
            def append(text: str, key: str | None) -> httpx.Response:
                headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
                return http.post("/users/dan/chunks", json={"chunks": [text]}, headers=headers)

            assert append("first", "k-1").status_code == 200
            store.armed = True
            lost = append("second", "k-2")
            assert _is_503_with_retry_after(lost), lost.text
            assert http.get("/users/dan", headers=AUTH).json()["num_chunks"] == 2  # it landed all the same
            retried = append("second", "k-2")
            assert retried.status_code == 200 and retried.headers["idempotent-replayed"] == "true"
            assert retried.json()["num_chunks"] == 2 and retried.json()["version"] == 2
            reused = append("something else", "k-2")
            assert reused.status_code == 422 and reused.json()["error"]["param"] == "Idempotency-Key"
            assert "idempotent-replayed" not in append("third", "k-3").headers
            assert [c.text for c in store.get("dan").chunks] == ["first", "second", "third"]
            store.armed = True
            assert append("fourth", None).status_code == 503
            assert append("fourth", None).status_code == 200  # without a key the retry appends again
            assert [c.text for c in store.get("dan").chunks][-2:] == ["fourth", "fourth"]
    finally:
        store.close()
        redis.kill()


def test_sqlite_locked_past_its_timeout_is_503_and_health_says_degraded(tmp_path, model_dir, api_keys):
    import sqlite3

    app = _app(model_dir, api_keys, backend="sqlite", path=str(tmp_path / "users.sqlite"), timeout_s=0.3)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.put("/users/eve", json={"chunks": ["hello"]}, headers=AUTH).status_code == 200
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["user_store"] == {"backend": "sqlite", "available": True,
                                                                     "error": None}
        holder = sqlite3.connect(tmp_path / "users.sqlite", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # e.g. a backup or another process holding the write lock
        try:
            for method, path, body in (("put", "/users/eve", {"chunks": ["again"]}),
                                       ("post", "/users/eve/chunks", {"chunks": ["more"]}),
                                       ("delete", "/users/eve", None)):
                refused = http.request(method, path, json=body, headers=AUTH)
                assert _is_503_with_retry_after(refused), (method, refused.status_code, refused.text)
                assert "database is locked" in refused.json()["error"]["message"]
            health = http.get("/health").json()
            assert health["status"] == "degraded" and health["user_store"]["available"] is False
            assert "database is locked" in health["user_store"]["error"]
            assert http.get("/users/eve", headers=AUTH).status_code == 200  # readers do not wait in WAL mode
            vectors = http.post("/embed/statements", json={"statements": ["likes jazz"]})
            assert vectors.status_code == 200 and np.isfinite(vectors.json()["embeddings"]).all()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/users/eve/chunks", json={"chunks": ["more"]}, headers=AUTH).json()["num_chunks"] == 2
