"""The UUE Serve application on the local Ray cluster, exercised over real HTTP on 127.0.0.1.

One application (tiny towers, replicas min 1 / max 2) serves every test in this module: embeddings equal
in-process inference, score/retrieve agree with the index, the official `openai` client works, bad
requests get clear 4xx without hurting good ones, an index swap under load fails no request, and the
Prometheus endpoint shows Serve's and our metrics.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from uue.evaluation.calibration import PlattCalibrator
from uue.model import UUEModel
from uue.model.inference import UUEInference
from uue.serving.index_slot import IndexMismatchError, IndexSlot, point_index

USERS = [
    ["Summited the ridge at dawn", {"text": "new trail shoes are great", "platform": "forum"}],
    ["made fresh pasta tonight", "the risotto needed more stock"],
    [{"text": "that horror film kept me up", "timestamp": "2025-06-01T08:00:00Z"}],
]
STATEMENTS = ["loves hiking in the mountains", "enjoys cooking at home", "would enjoy a horror film"]
EXTRA_STATEMENTS = [
    {"statement_id": "extra_0", "text": "collects vintage synthesizers"},
    {"statement_id": "extra_1", "text": "volunteers at the animal shelter"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_config_module):
    folder = tmp_path_factory.mktemp("serve") / "model"
    UUEModel.from_config(tiny_model_config_module, seed=3).save_pretrained(folder)
    # A real Platt fit (on synthetic scores) so /score and /retrieve return calibrated probabilities.
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.5, 0.2, 64), rng.normal(-0.1, 0.2, 64)])
    PlattCalibrator.fit(scores, np.r_[np.ones(64), np.zeros(64)]).save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_config_module():
    from uue.config import ModelConfig

    return ModelConfig(
        user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4, max_chunk_length=32,
        max_statement_length=16, max_context_length=8, num_chunks_per_user=8, dropout=0.0,
        num_negative_samples=0, negative_sampling="none",
    )


@pytest.fixture(scope="module")
def indexes(ray_session, model_dir, sample_data_dir, tmp_path_factory):
    """Two real index versions built by batch indexing: the sample statements, then those plus two more."""
    from uue.index.build import build_index

    root = tmp_path_factory.mktemp("indexes")
    extra = root / "more_statements.jsonl"
    rows = [json.loads(line) for line in (sample_data_dir / "statements.jsonl").read_text().splitlines() if line]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows + EXTRA_STATEMENTS))
    common = dict(min_actors=1, max_actors=1, batch_size=16, cpus_per_actor=0.5, progress=False)
    v1 = build_index(model_dir, sample_data_dir, root / "v1", **common)
    v2 = build_index(model_dir, extra, root / "v2", **common)
    pointer = root / "CURRENT"
    point_index(pointer, root / "v1")
    return {"pointer": pointer, "v1": root / "v1", "v2": root / "v2", "v1_version": v1["version"],
            "v2_version": v2["version"]}


@pytest.fixture(scope="module")
def server(ray_session, model_dir, indexes, tmp_path_factory):
    from ray import serve

    from serve.app import build_app
    from uue.serving.settings import ServeArgs

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 2, "batch_wait_timeout_s": 0.01}
    args = ServeArgs(
        model_dir=str(model_dir), index=str(indexes["pointer"]), index_poll_s=0.5,
        limits={"max_request_bytes": 100_000, "max_chunks_per_user": 20, "max_statements_per_request": 16},
        user_tower={**small, "max_batch_size": 32, "max_ongoing_requests": 32},
        # Two item-tower replicas from the start (one is killed under load below); each request waits up to
        # 50 ms for its batch, so a replica always holds requests when it dies.
        item_tower={**small, "min_replicas": 2, "batch_wait_timeout_s": 0.05, "max_batch_size": 16,
                    "max_ongoing_requests": 32},
        ingress={"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 2},
        # API keys: conftest's ray_session puts UUE_TEST_API_KEYS in the replicas' environment.
        user_store={"path": str(tmp_path_factory.mktemp("store") / "users.sqlite"),
                    "api_keys_env": "UUE_TEST_API_KEYS"},
    )
    serve.run(build_app(args), name="uue", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        yield {"url": base, "client": client, "args": args}
    serve.delete("uue")
    serve.shutdown()


@pytest.fixture(scope="module")
def local_model(model_dir):
    return UUEInference(model_dir, device="cpu")


def test_application_has_both_tower_deployments_and_health(server, indexes):
    from ray import serve

    status = serve.status().applications["uue"]
    assert status.status == "RUNNING"
    assert {"UserTower", "ItemTower", "Ingress"} <= set(status.deployments)
    # What the dashboard's /api/serve/applications/ shows: each tower deployed with its own autoscaling and
    # a max_ongoing_requests that lets its batches fill.
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"]["uue"]["deployments"]
    for name, tower in (("UserTower", server["args"].user_tower), ("ItemTower", server["args"].item_tower)):
        config = details[name]["deployment_config"]
        assert config["autoscaling_config"]["min_replicas"] == tower.min_replicas
        assert config["autoscaling_config"]["max_replicas"] == tower.max_replicas == 2
        assert config["max_ongoing_requests"] == tower.max_ongoing_requests >= tower.max_batch_size
    health = server["client"].get("/health").json()
    assert health["status"] == "ok" and health["dimension"] == 16 and health["calibrated"] is True
    assert health["index"]["count"] == 16


def test_concurrent_embeddings_equal_in_process_inference(server, local_model):
    """Requests sent at once are batched by the towers; every vector still equals unbatched inference."""
    client = server["client"]

    def embed_user(chunks):
        return client.post("/embed/users", json={"users": [{"chunks": chunks}]})

    def embed_statement(text):
        return client.post("/embed/statements", json={"statements": [text]})

    with ThreadPoolExecutor(8) as pool:
        user_responses = list(pool.map(embed_user, USERS * 3))
        statement_responses = list(pool.map(embed_statement, STATEMENTS * 3))
    expected_users = local_model.encode_users(USERS * 3)
    expected_statements = local_model.encode_statements(STATEMENTS * 3)
    for response, expected in zip(user_responses, expected_users, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["embeddings"][0], expected, atol=1e-5)
    for response, expected in zip(statement_responses, expected_statements, strict=True):
        np.testing.assert_allclose(response.json()["embeddings"][0], expected, atol=1e-5)
    # One request with several users / statements gives the same vectors.
    many = client.post("/embed/users", json={"users": [{"chunks": c} for c in USERS]}).json()
    np.testing.assert_allclose(many["embeddings"], expected_users[: len(USERS)], atol=1e-5)
    # Ten users of eight chunks (80 chunks) in one request: batched, but never over the 32-chunk budget.
    from ray import serve

    big = [[f"{text} {i}" for text in (USERS[1] * 4)] for i in range(10)]
    response = client.post("/embed/users", json={"users": [{"chunks": c} for c in big]})
    np.testing.assert_allclose(response.json()["embeddings"], local_model.encode_users(big), atol=1e-5)
    user_stats = serve.get_deployment_handle("UserTower", app_name="uue").info.remote().result()
    item_stats = serve.get_deployment_handle("ItemTower", app_name="uue").info.remote().result()
    assert 4 <= user_stats["largest_batch_users"] and user_stats["largest_batch_chunks"] <= 32, user_stats
    assert user_stats["batches"] < user_stats["users"] and item_stats["batches"] <= item_stats["statements"]
    with_context = client.post("/embed/statements", json={"statements": [
        {"text": "would like a cookbook as a gift", "context": "a gift suggestion"}]}).json()
    from uue.data.schema import Statement

    np.testing.assert_allclose(with_context["embeddings"][0], local_model.encode_statements(
        [Statement("", "would like a cookbook as a gift", "a gift suggestion")])[0], atol=1e-5)


def test_score_gives_similarity_and_calibrated_probability(server, local_model, model_dir, indexes):
    from uue.index import StatementIndex

    body = {"user": {"chunks": USERS[0]}, "statements": STATEMENTS[:2], "statement_ids": ["cooking_0"]}
    response = server["client"].post("/score", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    user = local_model.encode_users([USERS[0]])[0]
    texts = local_model.encode_statements(STATEMENTS[:2])
    text, indexed = StatementIndex.load(indexes["v1"]).statement("cooking_0")
    expected = np.r_[texts @ user, indexed @ user]
    got = [s["similarity"] for s in result["scores"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    calibrator = PlattCalibrator.load(model_dir)
    np.testing.assert_allclose([s["probability"] for s in result["scores"]], calibrator.predict(expected), atol=1e-5)
    assert result["calibrated"] is True and result["scores"][2]["text"] == text
    assert result["scores"][2]["statement_id"] == "cooking_0" and result["index_version"] == indexes["v1_version"]


def test_retrieve_returns_the_index_top_k(server, local_model, indexes):
    from uue.index import StatementIndex

    response = server["client"].post("/retrieve", json={"user": {"chunks": USERS[1]}, "k": 5})
    assert response.status_code == 200, response.text
    result = response.json()
    exact = StatementIndex.load(indexes["v1"]).search(local_model.encode_users([USERS[1]]), 5, exact=True)[0]
    assert [s["statement_id"] for s in result["scores"]] == [sid for sid, _, _ in exact]
    np.testing.assert_allclose([s["similarity"] for s in result["scores"]], [s for _, _, s in exact], atol=1e-4)
    assert all(s["text"] and 0 < s["probability"] < 1 for s in result["scores"])
    assert result["index_version"] == indexes["v1_version"] and result["k"] == 5


def test_openai_client_float_and_base64(server, local_model):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="not-checked", max_retries=0)
    expected = local_model.encode_statements(STATEMENTS)
    default = client.embeddings.create(model="uue-statements", input=STATEMENTS)  # the client asks for base64
    as_float = client.embeddings.create(model="uue-statements", input=STATEMENTS, encoding_format="float")
    single = client.embeddings.create(model="uue-statements", input=STATEMENTS[0])
    for result in (default, as_float):
        assert [d.index for d in result.data] == [0, 1, 2]
        np.testing.assert_allclose([d.embedding for d in result.data], expected, atol=1e-5)
        assert result.usage.prompt_tokens > 0
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-5)
    raw = server["client"].post("/v1/embeddings", json={"model": "uue-statements", "input": STATEMENTS[:1],
                                                         "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)  # the wire format really is base64
    users = client.embeddings.create(model="uue-users", input=["made fresh pasta tonight"])
    np.testing.assert_allclose(users.data[0].embedding,
                               local_model.encode_users([["made fresh pasta tonight"]])[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


REPLACEMENT_LIMIT_S = 300
"""How long a killed replica's replacement may take to load and report healthy: within 120 s on an idle 2-core
machine, past 120 s when training shares its cores (a limit on liveness, not a speed bound)."""

BAD_REQUESTS = [
    # (what, path, kwargs, status, words the message must contain)
    ("malformed JSON", "/embed/users", {"content": b'{"users": [', "headers": {"content-type": "application/json"}},
     400, "malformed JSON"),
    ("not JSON at all", "/score", {"content": b"hello"}, 422, "JSON object"),
    ("wrong type: chunks is a string", "/embed/users", {"json": {"users": [{"chunks": "just text"}]}}, 422,
     "users.0.chunks"),
    ("wrong type: k is a word", "/retrieve", {"json": {"user": {"chunks": ["x"]}, "k": "ten"}}, 422, "k: "),
    ("missing field", "/retrieve", {"json": {"k": 3}}, 422, "give exactly one of `user`"),
    ("unknown field", "/embed/statements", {"json": {"statements": ["x"], "extra": 1}}, 422, "extra"),
    ("empty text", "/embed/statements", {"json": {"statements": ["   "]}}, 422, "empty"),
    ("empty chunk object", "/embed/users", {"json": {"users": [{"chunks": [{"text": ""}]}]}}, 422, "empty"),
    ("no chunks", "/embed/users", {"json": {"users": [{"chunks": []}]}}, 422, "users.0.chunks"),
    ("bad timestamp", "/embed/users", {"json": {"users": [{"chunks": [{"text": "a", "timestamp": "yesterday"}]}]}},
     422, "ISO-8601"),
    ("too many chunks", "/embed/users", {"json": {"users": [{"chunks": ["a"] * 21}]}}, 422, "at most 20"),
    ("too many statements", "/embed/statements", {"json": {"statements": ["a"] * 17}}, 422, "at most 16"),
    ("k over the bound", "/retrieve", {"json": {"user": {"chunks": ["x"]}, "k": 1000}}, 422, "at most 100"),
    ("oversized body", "/embed/statements", {"json": {"statements": ["word " * 30_000]}}, 413, "at most 100000"),
    ("unknown statement id", "/score", {"json": {"user": {"chunks": ["x"]}, "statement_ids": ["no_such_id"]}}, 404,
     "no_such_id"),
    ("nothing to score", "/score", {"json": {"user": {"chunks": ["x"]}}}, 422, "statement_ids"),
    ("unknown model", "/v1/embeddings", {"json": {"model": "gpt-x", "input": "a"}}, 404, "gpt-x"),
    ("token arrays", "/v1/embeddings", {"json": {"model": "uue-statements", "input": [[1, 2, 3]]}}, 422, "input"),
    ("empty input", "/v1/embeddings", {"json": {"model": "uue-statements", "input": ""}}, 422, "empty"),
    ("wrong dimensions", "/v1/embeddings", {"json": {"model": "uue-statements", "input": "a", "dimensions": 8}},
     400, "16-dimensional"),
    ("bad encoding", "/v1/embeddings", {"json": {"model": "uue-statements", "input": "a", "encoding_format": "hex"}},
     422, "encoding_format"),
    ("unknown route", "/embed/everything", {"json": {}}, 404, "Not Found"),
]


def test_burst_of_bad_requests_gets_clear_4xx_and_good_requests_still_succeed(server, local_model):
    client = server["client"]

    def send(case):
        _, path, kwargs, _, _ = case
        return client.post(path, **kwargs)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, BAD_REQUESTS * 2))
    for (what, _, _, status, words), response in zip(BAD_REQUESTS * 2, responses, strict=True):
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        error = response.json()["error"]
        assert words in error["message"], f"{what}: {error}"
        assert error["type"] == "invalid_request_error"
    with ThreadPoolExecutor(8) as pool:
        good = list(pool.map(lambda text: client.post("/embed/statements", json={"statements": [text]}),
                             STATEMENTS * 4))
    assert [r.status_code for r in good] == [200] * len(good)
    np.testing.assert_allclose([r.json()["embeddings"][0] for r in good],
                               local_model.encode_statements(STATEMENTS * 4), atol=1e-5)


def test_index_hot_swap_under_load_fails_no_request(server, indexes):
    """Point the index pointer at a new version while clients keep retrieving: no failure, then the new version."""
    client = server["client"]
    assert client.get("/health").json()["index"]["version"] == indexes["v1_version"]
    results: list[tuple[int, str | None, float]] = []
    stop = threading.Event()

    def keep_retrieving():
        while not stop.is_set():
            try:
                response = client.post("/retrieve", json={"user": {"chunks": USERS[2]}, "k": 20})
                version = response.json().get("index_version") if response.status_code == 200 else None
                results.append((response.status_code, version, time.monotonic()))
            except httpx.HTTPError as err:  # a refused connection is a failed request too
                results.append((599, repr(err), time.monotonic()))

    workers = [threading.Thread(target=keep_retrieving) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2.0)
        point_index(indexes["pointer"], indexes["v2"])
        swapped_at = time.monotonic()
        reload = client.post("/admin/reload-index").json()  # this replica now; the others within index_poll_s
        assert reload["version"] == indexes["v2_version"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            recent = [v for _, v, t in results[-10:] if t > swapped_at + 1.0]
            if len(recent) == 10 and set(recent) == {indexes["v2_version"]}:
                break
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    statuses = [status for status, _, _ in results]
    assert len(results) > 10 and statuses == [200] * len(results), [r for r in results if r[0] != 200][:3]
    versions = [version for _, version, _ in results]
    assert versions[0] == indexes["v1_version"] and versions[-5:] == [indexes["v2_version"]] * 5
    assert set(versions) == {indexes["v1_version"], indexes["v2_version"]}
    top = client.post("/retrieve", json={"user": {"chunks": USERS[2]}, "k": 18}).json()
    assert len(top["scores"]) == 18 and {"extra_0", "extra_1"} <= {s["statement_id"] for s in top["scores"]}


def _metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _ingress_log_count(ray_module, words: str) -> int:
    """Lines containing `words` in the Serve ingress replicas' log files of this Ray session."""
    logs = Path(ray_module._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(line.count(words) for log in logs.glob("replica_*Ingress*.log")
               for line in log.read_text(errors="replace").splitlines())


def test_killing_a_tower_replica_under_load_loses_no_request(server, ray_session, local_model):
    """8 clients embed statements while one of the two ItemTower replicas is killed: every request gets 200
    with the right vector (the ingress resends calls whose replica died), and the app is healthy again once
    the controller's replacement replica runs."""
    import ray
    from ray import serve

    client = server["client"]
    expected = dict(zip(STATEMENTS, local_model.encode_statements(STATEMENTS), strict=True))
    results: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def keep_embedding(worker: int):
        i = 0
        while not stop.is_set():
            text = STATEMENTS[(worker + i) % len(STATEMENTS)]
            i += 1
            try:
                if i % 2:
                    response = client.post("/embed/statements", json={"statements": [text]})
                else:
                    response = client.post("/v1/embeddings", json={"model": "uue-statements", "input": text,
                                                                   "encoding_format": "float"})
                results.append((response.status_code, text, response.text))
            except httpx.HTTPError as err:  # a dropped connection is a lost request too
                results.append((599, text, repr(err)))

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "#ItemTower#" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    port = ray_session.nodes()[0]["MetricsExportPort"]
    workers = [threading.Thread(target=keep_embedding, args=(w,)) for w in range(8)]
    for worker in workers:
        worker.start()
    recovered_after, seen = None, []
    try:
        time.sleep(2.0)
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=True)
        deadline = killed_at + REPLACEMENT_LIMIT_S
        while time.monotonic() < deadline:
            app = serve.status().applications["uue"]
            tower = app.deployments["ItemTower"]
            seen.append(f"{app.status}/{tower.status}")
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#ItemTower#" in a["name"]]
            # Healthy again: the dead replica is gone, its replacement runs, and Serve reports both as such.
            if replicas[0]["name"] not in names and len(names) == 2 and app.status == "RUNNING" and \
                    tower.status == "HEALTHY" and tower.replica_states.get("RUNNING", 0) == 2:
                recovered_after = time.monotonic() - killed_at
                break
            time.sleep(0.5)
        time.sleep(1.0)  # keep the load on the replacement for a moment
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert recovered_after is not None, f"ItemTower not healthy again within {REPLACEMENT_LIMIT_S} s: {serve.status()}"
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 50 and not failed, (len(failed), failed[:3])
    for _, text, body in results:
        payload = json.loads(body)
        vector = payload["embeddings"][0] if "embeddings" in payload else payload["data"][0]["embedding"]
        np.testing.assert_allclose(vector, expected[text], atol=1e-5)
    assert client.get("/health").json()["status"] == "ok"
    # The victim really carried load before it died (its replica log has the calls it answered). Whether a call
    # was still running on it at the kill is timing: Serve's router moves queued calls to the live replica by
    # itself, the ingress resends the ones that were running (HandleBackend's resend and 503 paths are tested
    # deterministically in test_serve_openapi.py); the count is reported, not required.
    victim_id = replicas[0]["name"].rsplit("#", 1)[-1]
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path()) / "serve"
    served_by_victim = sum(log.read_text(errors="replace").count("CALL embed OK")
                           for log in logs.glob(f"replica_*ItemTower_{victim_id}.log"))
    assert served_by_victim > 0, f"the killed replica {victim_id} answered no call before the kill"
    retries = max(_ingress_log_count(ray_session, "replica gone"),
                  _metric_total(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text,
                                "ray_uue_tower_retries_total"))
    print(f"{len(results)} requests, 0 failed, {retries:.0f} tower calls resent; healthy again "
          f"{recovered_after:.1f} s after the kill (app/ItemTower status seen: {sorted(set(seen))})")


def test_index_slot_keeps_serving_when_a_new_version_is_bad(indexes, tmp_path):
    """Pointer and in-place rebuilds swap; a missing folder or another model's index is refused, the current stays."""
    from uue.index import StatementIndex

    pointer = tmp_path / "CURRENT"
    point_index(pointer, indexes["v1"])
    fingerprint = StatementIndex.load(indexes["v1"]).checkpoint_fingerprint
    slot = IndexSlot(pointer, model_fingerprint=fingerprint, dimension=16)
    assert slot.refresh() is True and slot.refresh() is False
    point_index(pointer, tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        slot.refresh()
    assert slot.current.version == StatementIndex.load(indexes["v1"]).version and "missing" in slot.last_error
    # An index folder rebuilt in place: the indexer renames the old folder away, then the new one in.
    live = tmp_path / "live"
    shutil.copytree(indexes["v1"], live)
    in_place = IndexSlot(live, model_fingerprint=fingerprint, dimension=16)
    assert in_place.refresh() is True
    live.rename(tmp_path / "retired")
    with pytest.raises(FileNotFoundError):  # the moment between the two renames
        in_place.refresh()
    shutil.copytree(indexes["v2"], live)
    assert in_place.refresh() is True and in_place.current.version == StatementIndex.load(indexes["v2"]).version
    other = IndexSlot(indexes["v2"], model_fingerprint="0" * 64, dimension=16)
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        other.refresh()
    assert other.current is None


def test_prometheus_endpoint_has_serve_and_uue_metrics(server, ray_session):
    """Ray's metrics agent exposes Serve's own and our custom metrics where Prometheus scrapes them."""
    client = server["client"]
    client.post("/embed/statements", json={"statements": ["enjoys cooking at home"]})
    client.post("/embed/statements", json={"statements": [""]})  # a rejected request
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_serve_num_http_requests", "ray_uue_http_requests_total", "ray_uue_rejected_requests_total",
              "ray_uue_embedded_total", "ray_uue_user_tower_chunks_total", "ray_uue_index_statements"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"metrics missing from :{port}/metrics: {missing}"
    lines = [line for line in text.splitlines() if line.startswith("ray_uue_http_requests_total{")]
    assert any('route="/embed/statements"' in line and 'status="200"' in line for line in lines), lines[:5]


def test_admin_routes_need_the_token_or_a_loopback_client(model_dir, indexes):
    """With a token: 401 without it or with a wrong one, the reload with it (real HTTP on 127.0.0.1).
    Without a token: a non-loopback client gets 403, a loopback one gets through."""
    import asyncio

    import uvicorn

    from uue.serving.local import build_local_app

    token = "s3cret-admin-token"
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_local_app(model_dir, index=str(indexes["pointer"]), admin_token=token),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            missing = client.post("/admin/reload-index")
            wrong = client.post("/admin/reload-index", headers={"Authorization": f"Bearer {token}x"})
            right = client.post("/admin/reload-index", headers={"Authorization": f"Bearer {token}"})
            health = client.get("/health")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["param"] == "authorization"
    assert right.status_code == 200 and right.json()["version"] in (indexes["v1_version"], indexes["v2_version"])
    assert health.status_code == 200  # the other routes need no token

    open_app = build_local_app(model_dir, index=str(indexes["pointer"]))

    async def call(client_host: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=open_app, client=(client_host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://uue") as client:
            return await client.post("/admin/reload-index")

    remote, local = asyncio.run(call("10.0.0.7")), asyncio.run(call("127.0.0.1"))
    assert remote.status_code == 403 and "loopback" in remote.json()["error"]["message"]
    assert local.status_code == 200


def test_stored_users_through_the_tower_deployments(server, local_model):
    """PUT + append through the UserTower deployment equal encoding the whole history; user_id works in
    /score (with explanations) and /retrieve; keys are enforced; DELETE removes the user."""
    client = server["client"]
    key, reader = {"Authorization": "Bearer serve-test-key"}, {"Authorization": "Bearer serve-test-reader"}
    history = [{"text": f"stored message {i} about {STATEMENTS[i % 3]}", "timestamp": f"2025-04-{i + 1:02d}T00:00:00Z",
                "platform": "forum" if i % 2 else None} for i in range(10)]
    assert client.put("/users/serve-u1", json={"chunks": history[:6]}).status_code == 401
    assert client.put("/users/serve-u1", json={"chunks": history[:6]}, headers=reader).status_code == 403
    put = client.put("/users/serve-u1", json={"chunks": history[:6]}, headers=key)
    assert put.status_code == 200, put.text
    with ThreadPoolExecutor(4) as pool:  # concurrent appends through the deployments
        appended = list(pool.map(lambda c: client.post("/users/serve-u1/chunks", json={"chunks": [c]}, headers=key),
                                 history[6:]))
    assert [r.status_code for r in appended] == [200] * 4, [r.text for r in appended]
    stored = client.get("/users/serve-u1", headers=reader).json()
    by_seq = sorted(stored["chunks"], key=lambda c: c["seq"])
    assert stored["num_chunks"] == 8 and stored["version"] == 5 and [c["seq"] for c in by_seq] == list(range(2, 10))
    np.testing.assert_allclose(stored["embedding"], local_model.encode_users([history])[0], atol=1e-5)
    by_id = client.post("/retrieve", json={"user_id": "serve-u1", "k": 5}, headers=reader).json()
    inline = client.post("/retrieve", json={"user": {"chunks": history}, "k": 5}).json()
    assert [s["statement_id"] for s in by_id["scores"]] == [s["statement_id"] for s in inline["scores"]]
    explained = client.post("/score", headers=reader, json={"user_id": "serve-u1", "statements": STATEMENTS,
                                                            "explain": True, "explain_top": 2}).json()
    assert explained["explanation_method"] == "leave_one_out"
    assert all(len(s["explanation"]) == 2 and 0 <= s["explanation"][0]["index"] < 8 for s in explained["scores"])
    assert client.delete("/users/serve-u1", headers=reader).status_code == 403
    assert client.delete("/users/serve-u1", headers=key).json()["deleted"] is True
    assert client.get("/users/serve-u1", headers=key).status_code == 404
