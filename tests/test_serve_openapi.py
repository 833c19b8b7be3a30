"""The OpenAPI document is the HTTP API's contract: a bounded schemathesis run (its default checks) over every
route finds no 5xx and no response the document does not describe (status, headers, body), and invalid data
is refused.

The app is the one the Serve ingress builds (`build_http_app`), here over in-process towers
(`build_local_app`) with a real index and small limits, called through ASGI with an API key, so the stored-user
routes are fuzzed past their key check: no Ray Serve needed, so the fuzzing stays within seconds. The README's
`serve run` is fuzzed by the schemathesis CLI, with no options, in tests/test_serve_cli.py.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from uue.serving.settings import RequestLimits, UserStoreArgs

LIMITS = RequestLimits(max_request_bytes=1_000_000, max_users_per_request=3, max_chunks_per_user=4,
                       max_statements_per_request=4, max_text_chars=200, max_top_k=8)
MAX_EXAMPLES = 15
FUZZ_KEY = "fuzz-api-key"


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, ray_session, sample_data_dir):
    from uue.config import ModelConfig
    from uue.index.build import build_index
    from uue.model import UUEModel
    from uue.serving.local import build_local_app

    root = tmp_path_factory.mktemp("openapi")
    config = ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4,
                         max_chunk_length=32, max_statement_length=16, num_chunks_per_user=4,
                         use_user_metadata=True, use_item_metadata=True)
    UUEModel.from_config(config, seed=5).save_pretrained(root / "model")
    build_index(root / "model", sample_data_dir, root / "index", min_actors=1, max_actors=1, batch_size=16,
                cpus_per_actor=0.5, progress=False)
    # Stored users too, with an API key the fuzzer sends (refused keys are tested in test_user_http.py).
    os.environ["UUE_FUZZ_API_KEYS"] = FUZZ_KEY
    store = UserStoreArgs(path=str(root / "users.sqlite"), api_keys_env="UUE_FUZZ_API_KEYS")
    return build_local_app(root / "model", limits=LIMITS, index=str(root / "index"), user_store=store)


def test_every_route_keeps_the_openapi_contract(fuzzed_app):
    """Schemathesis generates valid and invalid requests for every operation of the document (a bounded,
    deterministic run) and checks each response: no 5xx, a documented status, content type, headers and a body
    matching its schema, invalid data refused with a documented 4xx."""
    from hypothesis import given
    from schemathesis import GenerationMode

    api = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "GET /health", "POST /embed/users", "POST /embed/statements", "POST /score", "POST /retrieve",
        "GET /v1/models", "POST /v1/embeddings", "POST /admin/reload-index", "PUT /users/{user_id}",
        "POST /users/{user_id}/chunks", "GET /users/{user_id}", "DELETE /users/{user_id}"}
    calls: dict[str, int] = {}

    def fuzzer(operation, mode):
        name = f"{operation.method.upper()} {operation.path} ({mode.value})"

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            calls[name] = calls.get(name, 0) + 1
            case.call_and_validate(headers={"Authorization": f"Bearer {FUZZ_KEY}"})

        return fuzz

    paths = fuzzed_app.openapi()["paths"]
    for operation in operations:
        fuzzer(operation, GenerationMode.POSITIVE)()
        if "requestBody" in paths[operation.path][operation.method.lower()]:  # else nothing to make invalid
            fuzzer(operation, GenerationMode.NEGATIVE)()
    assert all(calls.get(f"{op.method.upper()} {op.path} (positive)") for op in operations), calls
    print(f"schemathesis: {sum(calls.values())} requests over {len(operations)} operations")


def test_document_states_limits_model_names_and_error_bodies(fuzzed_app):
    """The document carries the configured bounds and model names, and no FastAPI `{"detail": ...}` error."""
    document = fuzzed_app.openapi()
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and "x-uue-" not in text
    schemas = document["components"]["schemas"]
    assert schemas["OpenAIEmbeddingsRequest"]["properties"]["model"]["enum"] == ["uue-statements", "uue-users"]
    chunks = schemas["UserIn"]["properties"]["chunks"]
    assert (chunks["minItems"], chunks["maxItems"]) == (1, LIMITS.max_chunks_per_user)
    text_schema = chunks["items"]["oneOf"][0]
    assert (text_schema["minLength"], text_schema["maxLength"]) == (1, 200)
    assert re.search(text_schema["pattern"], "\u3000\x1f\ufeff ") is None and re.search(text_schema["pattern"], " a ")
    assert schemas["RetrieveRequest"]["properties"]["k"]["anyOf"][0]["maximum"] == LIMITS.max_top_k
    # The stored-user key is a bearer scheme: required on /users, optional (only for `user_id`) where a
    # stored user may be read; no admin token is configured here, so /admin declares none (loopback only).
    assert document["components"]["securitySchemes"] == {"ApiKey": {"type": "http", "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["ApiKey"]["description"]}}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            security = operation.get("security")
            if path.startswith("/users"):
                assert security == [{"ApiKey": []}], (method, path)
                key_statuses = {"get": {"401", "409"}, "put": {"401", "403", "409"}, "post": {"401", "403", "409"},
                                "delete": {"401", "403"}}[method]
                assert set(responses) - set(document["paths"]["/health"]["get"]["responses"]) == key_statuses
            elif path in ("/score", "/retrieve", "/v1/embeddings"):
                assert security == [{"ApiKey": []}, {}], (method, path)
                key_statuses = {"401", "409"}
            else:
                assert security is None, (method, path)
                key_statuses = set()
            for status in ("400", "404", "405", "413", "422", "503", *key_statuses):
                body = responses[status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
            assert "Allow" in responses["405"]["headers"] and "Retry-After" in responses["503"]["headers"]
    append = document["paths"]["/users/{user_id}/chunks"]["post"]
    assert [p["name"] for p in append["parameters"]] == ["user_id", "Idempotency-Key"]
    assert "Idempotent-Replayed" in append["responses"]["200"]["headers"]


@pytest.mark.parametrize(("method", "path", "body", "status", "allow"), [
    ("post", "/embed/statements", {"statements": [""]}, 422, None),
    ("post", "/embed/statements", {"statements": ["a" * 201]}, 422, None),  # over maxLength: a schema violation
    ("post", "/retrieve", {"user": {"chunks": ["a"]}, "k": 9}, 422, None),  # over maximum
    ("post", "/embed/statements", {"statements": ["a" * 1_100_000]}, 413, None),  # over max_request_bytes
    ("post", "/v1/embeddings", {"model": "gpt-x", "input": "a"}, 404, None),
    ("get", "/score", None, 405, "POST"),
    ("options", "/users/ann", None, 405, "DELETE, GET, PUT"),  # three routes share the path
    ("patch", "/users/ann/chunks", None, 405, "POST"),
    ("post", "/embed/users", b'{"users": [', 400, None),
    ("get", "/users/ann", None, 401, None),
    ("post", "/score", {"user_id": "ann", "statements": ["a"]}, 401, None),
])
def test_error_responses_are_the_documented_body(fuzzed_app, method, path, body, status, allow):
    import jsonschema_rs

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fuzzed_app), base_url="http://uue") as c:
            if isinstance(body, bytes):
                return await c.request(method, path, content=body, headers={"content-type": "application/json"})
            return await c.request(method, path, json=body)

    import asyncio

    response = asyncio.run(call())
    assert response.status_code == status, response.text
    document = fuzzed_app.openapi()
    error_schema = {**document["components"]["schemas"]["ErrorBody"], "$defs": document["components"]["schemas"]}
    error_schema = json.loads(json.dumps(error_schema).replace("#/components/schemas/", "#/$defs/"))
    jsonschema_rs.validate(error_schema, response.json())
    assert response.headers.get("allow") == allow
    operations = document["paths"][re.sub(r"^/users/[^/]+", "/users/{user_id}", path)]
    documented = operations[method] if method in operations else next(iter(operations.values()))  # 405: any
    assert str(status) in documented["responses"]


def test_no_tower_replica_left_is_503_with_retry_after():
    """HandleBackend resends a call whose replica died; when every attempt fails the client gets 503 in the
    OpenAI error shape with Retry-After (never a bare 500). Handles here fail like a dead replica's do."""
    import asyncio

    from ray.exceptions import ActorDiedError

    from uue.serving.handles import HandleBackend
    from uue.serving.http import ServingService, build_http_app

    class Method:
        def __init__(self, failures: int):
            self.failures, self.calls = failures, 0

        def remote(self, arg):
            async def answer():
                self.calls += 1
                if self.calls <= self.failures:
                    raise ActorDiedError()
                return np.ones((len(arg), 4), np.float32) / 2, [3] * len(arg)
            return answer()

    class Handle:
        def __init__(self, failures: int):
            self.embed = Method(failures)

    retried: list[str] = []
    survives = HandleBackend(Handle(0), Handle(2), attempts=3, backoff_s=0.01, on_retry=retried.append)
    dead = HandleBackend(Handle(0), Handle(99), attempts=3, backoff_s=0.01, retry_after_s=7)

    async def call(backend) -> httpx.Response:
        app = build_http_app(ServingService(backend=backend, model_fingerprint="f" * 64, dimension=4,
                                            limits=RequestLimits()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://uue") as c:
            return await c.post("/embed/statements", json={"statements": ["a", "b"]})

    ok, refused = asyncio.run(call(survives)), asyncio.run(call(dead))
    assert ok.status_code == 200 and retried == ["ItemTower", "ItemTower"] and survives.item_tower.embed.calls == 3
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["type"] == "server_error" and "ItemTower" in refused.json()["error"]["message"]
    assert dead.item_tower.embed.calls == 3


def test_admin_token_is_declared_when_the_server_has_one():
    """With an admin token the reload route declares the AdminToken bearer scheme and refuses a request
    without it (401); without a token (the fuzzed app above) it declares none and answers loopback clients."""
    import asyncio

    from uue.serving.http import ServingService, build_http_app

    app = build_http_app(ServingService(backend=None, model_fingerprint="f" * 64, dimension=4,  # type: ignore[arg-type]
                                        limits=RequestLimits(), admin_token="s3cret"))
    document = app.openapi()
    assert document["paths"]["/admin/reload-index"]["post"]["security"] == [{"AdminToken": []}]
    assert document["components"]["securitySchemes"]["AdminToken"]["scheme"] == "bearer"

    async def reload(headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://uue") as c:
            return await c.post("/admin/reload-index", headers=headers)

    assert asyncio.run(reload({})).status_code == 401
    assert asyncio.run(reload({"Authorization": "Bearer s3cret"})).status_code == 409  # no index configured
