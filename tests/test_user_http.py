"""Stored users over real HTTP on 127.0.0.1 (the in-process app under uvicorn, SQLite store): API keys
(missing, wrong and read-only keys refused, changing nothing), put/append/get/delete, `user_id` in /score
and /v1/embeddings (with the official openai client), explanations, parallel appends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serving_helpers import save_tiny_model, serving

from uue.data.schema import UserChunk, UserData
from uue.serving.encoders import StatementEncoder, UserEncoder
from uue.serving.settings import UserStoreArgs

WRITE_KEY, READ_KEY = "rw-key-0123456789", "ro-key-9876543210"
WRITE = {"Authorization": f"Bearer {WRITE_KEY}"}
READ = {"Authorization": f"Bearer {READ_KEY}"}
HISTORY = [
    {"text": "Summited the ridge at dawn", "platform": "forum", "timestamp": "2025-01-01T08:00:00Z"},
    {"text": "made fresh pasta tonight", "timestamp": "2025-01-02T08:00:00Z"},
    {"text": "that horror film kept me up", "platform": "blog", "timestamp": "2025-01-03T08:00:00Z"},
]
MORE = [{"text": f"another note, number {i}", "timestamp": f"2025-02-{i + 1:02d}T08:00:00Z"} for i in range(8)]


def _user(chunks: list[dict]) -> UserData:
    return UserData("", [UserChunk(c["text"], c.get("platform"), c.get("timestamp")) for c in chunks])


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    import os

    from uue.serving.local import build_local_app

    root = tmp_path_factory.mktemp("user_http")
    save_tiny_model(root / "model", seed=5)
    previous = os.environ.get("UUE_TEST_API_KEYS")
    os.environ["UUE_TEST_API_KEYS"] = f"{WRITE_KEY}, {READ_KEY}:ro"
    store = UserStoreArgs(backend="sqlite", path=str(root / "users.sqlite"), api_keys_env="UUE_TEST_API_KEYS")
    try:
        with serving(build_local_app(root / "model", user_store=store)) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            yield {"client": client, "url": url, "db": root / "users.sqlite",
                   "users": UserEncoder(root / "model", device="cpu"),
                   "statements": StatementEncoder(root / "model", device="cpu")}
    finally:
        if previous is None:
            os.environ.pop("UUE_TEST_API_KEYS", None)
        else:
            os.environ["UUE_TEST_API_KEYS"] = previous


def _db_bytes(db) -> bytes:
    return b"".join(db.with_name(db.name + s).read_bytes() for s in ("", "-wal") if db.with_name(db.name + s).exists())


def test_missing_wrong_and_read_only_keys_are_refused_and_change_nothing(app_server):
    client = app_server["client"]
    body = {"chunks": HISTORY}
    assert client.put("/users/ann", json=body, headers=WRITE).status_code == 200
    before = client.get("/users/ann", headers=READ).json()
    wrong = {"Authorization": f"Bearer {WRITE_KEY}x"}
    attempts = [
        ("put", "/users/ann", {"json": {"chunks": MORE}}), ("post", "/users/ann/chunks", {"json": {"chunks": MORE}}),
        ("delete", "/users/ann", {}), ("put", "/users/newcomer", {"json": body}),
        ("post", "/users/newcomer/chunks", {"json": body}),
    ]
    for method, path, kwargs in attempts:
        for headers, status in (({}, 401), (wrong, 401), ({"Authorization": WRITE_KEY}, 401), (READ, 403)):
            response = client.request(method, path, headers=headers, **kwargs)
            assert response.status_code == status, (method, path, headers, response.text)
            assert response.json()["error"]["param"] == "authorization"
    # Even a refused request with an invalid body is refused for its key (checked before the body).
    assert client.put("/users/ann", json={"chunks": []}).status_code == 401
    for headers in ({}, wrong):
        assert client.get("/users/ann", headers=headers).status_code == 401
        assert client.post("/score", json={"user_id": "ann", "statements": ["x"]}, headers=headers).status_code == 401
        assert client.post("/v1/embeddings", headers=headers, json={
            "model": "uue-users", "input": ["ann"], "input_type": "user_id"}).status_code == 401
    assert client.get("/users/ann", headers=READ).json() == before  # nothing changed
    assert client.get("/users/newcomer", headers=WRITE).status_code == 404
    assert b"newcomer" not in _db_bytes(app_server["db"])
    # Users sent inline need no key, as before.
    assert client.post("/score", json={"user": {"chunks": ["x"]}, "statements": ["y"]}).status_code == 200


def test_put_append_get_score_and_embeddings_equal_a_full_recomputation(app_server):
    import openai

    client, users = app_server["client"], app_server["users"]
    put = client.put("/users/bea", json={"chunks": HISTORY}, headers=WRITE)
    assert put.status_code == 200, put.text
    assert put.json()["num_chunks"] == 3 and put.json()["version"] == 1
    for i in range(0, len(MORE), 3):
        response = client.post("/users/bea/chunks", json={"chunks": MORE[i : i + 3]}, headers=WRITE)
        assert response.status_code == 200, response.text
    stored = client.get("/users/bea", headers=READ).json()
    full = users.encode([_user(HISTORY + MORE)])[0]  # 11 chunks -> the 8 most recent
    np.testing.assert_allclose(stored["embedding"], full, atol=1e-5)
    assert stored["num_chunks"] == 8 and [c["seq"] for c in stored["chunks"]] == list(range(3, 11))
    assert all(set(c) == {"index", "seq", "timestamp", "platform", "text_hash"} for c in stored["chunks"])
    # user_id in /score gives what the same history sent inline gives.
    statements = ["loves hiking in the mountains", "enjoys cooking at home"]
    by_id = client.post("/score", json={"user_id": "bea", "statements": statements}, headers=READ).json()
    inline = client.post("/score", json={"user": {"chunks": HISTORY + MORE}, "statements": statements}).json()
    np.testing.assert_allclose([s["similarity"] for s in by_id["scores"]],
                               [s["similarity"] for s in inline["scores"]], atol=1e-5)
    # /v1/embeddings with the official client: its api_key is the bearer key.
    oa = openai.OpenAI(base_url=app_server["url"] + "/v1", api_key=READ_KEY, max_retries=0)
    result = oa.embeddings.create(model="uue-users", input=["bea"], extra_body={"input_type": "user_id"})
    np.testing.assert_allclose(result.data[0].embedding, full, atol=1e-5)
    assert client.get("/users/nobody", headers=READ).status_code == 404
    assert client.get("/users/bad%20id", headers=READ).status_code == 422
    both = client.post("/score", json={"user_id": "bea", "user": {"chunks": ["x"]}, "statements": ["y"]},
                       headers=READ)
    assert both.status_code == 422 and "exactly one" in both.json()["error"]["message"]


def test_explain_names_chunks_by_index_timestamp_and_platform(app_server):
    client = app_server["client"]
    client.put("/users/cy", json={"chunks": HISTORY}, headers=WRITE)
    for body, headers in (({"user_id": "cy"}, READ), ({"user": {"chunks": HISTORY}}, {})):
        response = client.post("/score", headers=headers, json={
            **body, "statements": ["would enjoy a horror film", "enjoys cooking at home"], "explain": True,
            "explain_top": 2})
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["explanation_method"] == "leave_one_out"
        for score in result["scores"]:
            top = score["explanation"]
            assert len(top) == 2 and top[0]["contribution"] >= top[1]["contribution"]
            for item in top:
                assert item["timestamp"] == HISTORY[item["index"]]["timestamp"]
                assert item["platform"] == HISTORY[item["index"]].get("platform")
    plain = client.post("/score", json={"user_id": "cy", "statements": ["x"]}, headers=READ).json()
    assert plain["scores"][0]["explanation"] is None


def test_parallel_appends_over_http_lose_no_chunk_and_delete_removes_the_user(app_server):
    client, users = app_server["client"], app_server["users"]
    chunks = [{"text": f"parallel message {i}", "timestamp": f"2025-03-{i + 1:02d}T00:00:00Z"} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda c: client.post("/users/dee-42/chunks", json={"chunks": [c]}, headers=WRITE), chunks))
    assert [r.status_code for r in responses] == [200] * 8
    stored = client.get("/users/dee-42", headers=READ).json()
    assert stored["num_chunks"] == 8 and stored["version"] == 8
    np.testing.assert_allclose(stored["embedding"], users.encode([_user(chunks)])[0], atol=1e-5)
    assert b"dee-42" in _db_bytes(app_server["db"])
    deleted = client.delete("/users/dee-42", headers=WRITE)
    assert deleted.status_code == 200 and deleted.json() == {"user_id": "dee-42", "deleted": True}
    assert client.get("/users/dee-42", headers=READ).status_code == 404
    assert b"dee-42" not in _db_bytes(app_server["db"])  # not in the database file, nor its WAL
    assert client.delete("/users/dee-42", headers=WRITE).json()["deleted"] is False
