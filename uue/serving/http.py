"""The UUE HTTP API as a FastAPI app, independent of where the towers run.

`build_http_app(service)` serves the routes over any `TowerBackend`: the Serve ingress passes one that
calls the tower deployments through `DeploymentHandle`s (batched, autoscaled), the benchmark's bare
peer one that runs both towers in-process. Routes:

    GET  /health                 model, index version, calibration
    POST /embed/users            {"users": [{"chunks": [...]}]}             -> unit vectors
    POST /embed/statements       {"statements": ["...", {"text": ...}]}     -> unit vectors
    POST /score                  {"user": {...}, "statements": [...], "statement_ids": [...]}
                                 -> similarity and calibrated probability per statement
    POST /retrieve               {"user": {...}, "k": 10} -> top-k statements of the index
    POST /v1/embeddings          OpenAI-compatible (input string or list; encoding_format float|base64)
    GET  /v1/models              OpenAI-compatible model list
    PUT/POST/GET/DELETE /users/{user_id}[/chunks]  stored users (uue.serving.user_routes; API keys)
    POST /admin/reload-index     re-read the index location now (replicas also poll it); needs
                                 `Authorization: Bearer <admin token>` when one is configured, else a
                                 loopback client

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 for malformed JSON,
422 for wrong types, empty text and lists, texts or `k` over the configured limits, 413 for bodies over
`max_request_bytes`, 404 for unknown statement ids, model names and routes, 405 (with the path's `Allow`)
for a wrong method, 401/403/409 for stored users (keys, another model), 503 (with `Retry-After`) when a
tower, the index or the user store is unavailable. The OpenAPI document (/openapi.json) is the contract: it
carries the configured limits and model names, the bearer schemes of the routes that take a key, and
documents every one of these errors with the body actually sent (`ERROR_RESPONSES`, applied to every route,
including routes added later; one handler per kind of error writes them all).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from uue.data.schema import Statement, UserChunk, UserData
from uue.evaluation.calibration import PlattCalibrator
from uue.serving.api import (
    ENUM_KEY,
    LIMIT_KEY,
    UNION_TAGS,
    USER_ID_PATTERN,
    ChunkContributionOut,
    EmbeddingsResponse,
    EmbedStatementsRequest,
    EmbedUsersRequest,
    ErrorBody,
    HealthResponse,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    OpenAIModelList,
    ReloadIndexResponse,
    RequestError,
    RetrieveRequest,
    RetrieveResponse,
    ScoredStatement,
    ScoreRequest,
    ScoreResponse,
    UserIn,
    as_statement,
    check_statement_texts,
    check_user,
    check_users,
    over_limit,
)
from uue.serving.auth import ADMIN_TOKEN, ApiKeys
from uue.serving.index_slot import IndexSlot
from uue.serving.metrics import ServingMetrics
from uue.serving.settings import RequestLimits
from uue.serving.user_routes import KEY_IF_USER_ID, add_user_routes, authorize, stored_user
from uue.serving.user_store import StoreUnavailableError
from uue.serving.users import PooledUser, UserService, explain_scores, inline_user


class TowerBackend(Protocol):
    """Where the towers run: Serve deployments behind handles, or in-process encoders."""

    async def embed_users(self, users: list[UserData]) -> np.ndarray: ...

    async def embed_statements(self, statements: list[Statement]) -> tuple[np.ndarray, list[int]]: ...


@dataclass
class ServingService:
    """What the routes need: towers, limits, model identity, calibration, the index, metrics."""

    backend: TowerBackend
    model_fingerprint: str
    dimension: int
    limits: RequestLimits
    statement_model_name: str = "uue-statements"
    user_model_name: str = "uue-users"
    calibrator: PlattCalibrator | None = None
    index: IndexSlot | None = None
    metrics: ServingMetrics | None = None
    admin_token: str | None = None
    """Bearer token of the /admin routes; None: they answer loopback clients only."""
    users: UserService | None = None
    """Stored users (None: no store configured); `api_keys` guard them."""
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    num_chunks_per_user: int = 0
    """The user tower's chunk budget (explanations of users sent inline select chunks as it does)."""
    retry_after_s: int = 5
    """`Retry-After` of the 503 answering a user store that did not answer (`StoreUnavailableError`)."""

    def probabilities(self, similarities: np.ndarray) -> list[float | None]:
        if self.calibrator is None:
            return [None] * len(similarities)
        return [float(p) for p in self.calibrator.predict(similarities)]

    def loaded_index(self):
        if self.index is None:
            raise RequestError(503, "no statement index configured: start the server with `index` set")
        current = self.index.current
        if current is None:
            raise RequestError(503, f"statement index not loaded yet ({self.index.last_error or 'loading'})",
                               retry_after_s=5)
        return current


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def check_admin(request: Request, admin_token: str | None) -> None:
    """401 without the configured bearer token; with none configured, 403 for any non-loopback client."""
    if admin_token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {admin_token}".encode()):
            raise RequestError(401, "admin routes need 'Authorization: Bearer <token>' (the admin token)",
                               "authorization")
        return
    client = request.client.host if request.client else None
    if client not in LOOPBACK_HOSTS:
        raise RequestError(403, f"admin routes answer loopback clients only (this one is {client}); configure "
                                "an admin token (ServeArgs.admin_token_env) to call them remotely")


logger = logging.getLogger("ray.serve")

ERROR_CODES = {404: "not_found", 413: "request_too_large", 503: "service_unavailable"}


def _error_doc(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        doc["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}
    return doc


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc("Malformed JSON body, or a value the model cannot serve (e.g. other `dimensions`)."),
    404: _error_doc("Unknown route, statement id, model name or stored user."),
    405: _error_doc("Method not allowed on this route.", {"Allow": "The methods this route answers."}),
    413: _error_doc("Body over `max_request_bytes` (refused before it is parsed)."),
    422: _error_doc("Wrong types, missing or unknown fields, empty text, bad timestamps, or a list, text or `k` "
                    "over the configured limits (the bounds this document states)."),
    500: _error_doc("A bug: the server failed in an unexpected way."),
    503: _error_doc("A tower, the statement index or the user store is unavailable right now (or no user store "
                    "is configured: then without Retry-After).",
                    {"Retry-After": "Seconds to wait before retrying."}),
}
"""The errors any route may answer, documented for every route of the app (FastAPI's own 422 entry, with a
`{"detail": ...}` body this API never sends, is replaced by it)."""

ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error_doc("Missing or wrong `Authorization: Bearer <admin token>`."),
    403: _error_doc("No admin token is configured and the client is not on loopback."),
    409: _error_doc("No index configured, or the new index version failed to load (the current one serves)."),
}


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = ERROR_CODES.get(status, str(status))
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _with_runtime_bounds(node: Any, limits: RequestLimits, enums: dict[str, list[Any]]) -> Any:
    """Write the configured limits (`LIMIT_KEY`) and the served model's values (`ENUM_KEY`) into a JSON schema."""
    if isinstance(node, dict):
        node = {key: _with_runtime_bounds(value, limits, enums) for key, value in node.items()}
        limit = node.pop(LIMIT_KEY, None)
        if limit is not None:
            bound = {"array": "maxItems", "string": "maxLength", "integer": "maximum"}[node["type"]]
            node[bound] = getattr(limits, limit)
        enum = node.pop(ENUM_KEY, None)
        if enum is not None:
            node["enum"] = enums[enum]
        return node
    if isinstance(node, list):
        return [_with_runtime_bounds(value, limits, enums) for value in node]
    return node


def _validation_message(err: RequestValidationError) -> tuple[int, str, str | None]:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"malformed JSON body: {detail}".rstrip(": "), None
    parts, first_param = [], None
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        # Union members (text | {...}) add their tag to the path; it says nothing to a client.
        loc = [p for p in loc if p not in UNION_TAGS and not p.startswith("function-")]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        if where == "body" and e.get("type") in ("model_attributes_type", "dict_type"):
            message = "expected a JSON object (with Content-Type: application/json)"
        parts.append(f"{where}: {message}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more, first_param


def _allowed_methods(app: FastAPI, path: str) -> str:
    """Every method some route of `path` answers (GET, PUT and DELETE /users/{id} are three routes)."""
    methods = {method for route in app.routes if getattr(route, "methods", None) and route.path_regex.match(path)
               for method in route.methods}
    return ", ".join(sorted(methods))


def _openai_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def build_http_app(service: ServingService) -> FastAPI:
    app = FastAPI(title="UUE: Universal User Embeddings", version="1", responses=ERROR_RESPONSES)
    limits = service.limits
    metrics = service.metrics
    model_names = [service.statement_model_name, service.user_model_name]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            enums = {"model_names": model_names, "dimension": [service.dimension]}
            app.openapi_schema = _with_runtime_bounds(document, limits, enums)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.middleware("http")
    async def limit_and_count(request: Request, call_next):
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_request_bytes):
            response = _error(413, f"request body of {length} bytes; at most {limits.max_request_bytes} allowed")
        elif length is None and request.method in ("POST", "PUT", "PATCH") and \
                len(await request.body()) > limits.max_request_bytes:
            response = _error(413, f"request body over {limits.max_request_bytes} bytes")
        else:
            response = await call_next(request)
        if metrics is not None:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.record_request(path, response.status_code, time.perf_counter() - started)
            if 400 <= response.status_code < 500:
                metrics.record_rejected(str(response.status_code))
        return response

    # The one place errors become responses: every route (and every route added later) answers through these.
    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(err)
        return _error(status, message, param)

    @app.exception_handler(RequestError)
    async def on_refused(request: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
        return _error(err.status, err.message, err.param, headers)

    @app.exception_handler(StoreUnavailableError)
    async def on_store_down(request: Request, err: StoreUnavailableError) -> JSONResponse:
        # Whatever the route and the backend: temporary, so 503 + Retry-After; a write that raised is not
        # acknowledged (a retry with the same Idempotency-Key is safe).
        logger.warning("%s %s: user store unavailable: %s", request.method, request.url.path, err)
        return _error(503, f"the user store is unavailable ({err}); retry in {service.retry_after_s} s",
                      headers={"Retry-After": str(service.retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        headers = err.headers
        if err.status_code == 405:  # Starlette names the first route of the path only; the path has them all
            headers = {**(headers or {}), "Allow": _allowed_methods(app, request.url.path)}
        return _error(err.status_code, str(err.detail), headers=headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); see the server log")

    def count(kind: str, n: int) -> None:
        if metrics is not None:
            metrics.record_embedded(kind, n)

    async def embed_user(user: UserData) -> np.ndarray:
        vectors = await service.backend.embed_users([user])
        count("users", 1)
        return vectors[0]

    async def the_user(request: Request, user: UserIn | None, user_id: str | None,
                       explain: bool = False) -> tuple[np.ndarray, PooledUser | None]:
        """The request's user: sent inline (`user`) or stored (`user_id`, needs an API key); with `explain`
        also its chunk vectors."""
        if (user is None) == (user_id is None):
            raise RequestError(422, "give exactly one of `user` (a history) or `user_id` (a stored user)", "user")
        if user_id is not None:
            pooled = await stored_user(service, request, user_id)
            return pooled.vector, pooled
        check_user(user, limits)
        if explain:
            pooled = await inline_user(service.backend, user.to_user(), service.num_chunks_per_user)
            count("users", 1)
            return pooled.vector, pooled
        return await embed_user(user.to_user()), None

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        store = await service.users.health() if service.users is not None else None
        return {
            "status": "degraded" if store is not None and not store["available"] else "ok",
            "model_fingerprint": service.model_fingerprint,
            "dimension": service.dimension,
            "calibrated": service.calibrator is not None,
            "index": service.index.status() if service.index else None,
            "user_store": store,
        }

    @app.post("/embed/users", response_model=EmbeddingsResponse)
    async def embed_users(body: EmbedUsersRequest) -> EmbeddingsResponse:
        check_users(body.users, limits)
        vectors = await service.backend.embed_users([u.to_user() for u in body.users])
        count("users", len(vectors))
        return EmbeddingsResponse(model_fingerprint=service.model_fingerprint, dimension=service.dimension,
                                  embeddings=vectors.tolist())

    @app.post("/embed/statements", response_model=EmbeddingsResponse)
    async def embed_statements(body: EmbedStatementsRequest) -> EmbeddingsResponse:
        statements = [as_statement(s) for s in body.statements]
        check_statement_texts([s.text for s in statements], limits)
        vectors, _ = await service.backend.embed_statements(statements)
        count("statements", len(vectors))
        return EmbeddingsResponse(model_fingerprint=service.model_fingerprint, dimension=service.dimension,
                                  embeddings=vectors.tolist())

    @app.post("/score", response_model=ScoreResponse, **KEY_IF_USER_ID)
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        if (body.user is None) == (body.user_id is None):
            raise RequestError(422, "give exactly one of `user` (a history) or `user_id` (a stored user)", "user")
        if body.user is not None:
            check_user(body.user, limits)
        if not body.statements and not body.statement_ids:
            raise RequestError(422, "give at least one of `statements` (texts) or `statement_ids`", "statements")
        statements = [as_statement(s) for s in body.statements]
        check_statement_texts([s.text for s in statements], limits, "statements")
        check_statement_texts(body.statement_ids, limits, "statement_ids")
        known: list[tuple[str, str, np.ndarray]] = []
        index_version = None
        if body.statement_ids:
            index = service.loaded_index()
            index_version = index.version
            for i, sid in enumerate(body.statement_ids):
                if sid not in index:
                    raise RequestError(404, f"statement_ids.{i}: unknown statement id {sid!r} "
                                            f"(index version {index.version})", f"statement_ids.{i}")
                text, vector = index.statement(sid)
                known.append((sid, text, vector))
        user_task = the_user(request, body.user, body.user_id, explain=body.explain)
        if statements:
            (user_vector, pooled), (text_vectors, _) = await asyncio.gather(
                user_task, service.backend.embed_statements(statements))
            count("statements", len(statements))
        else:
            (user_vector, pooled), text_vectors = await user_task, np.zeros((0, service.dimension), np.float32)
        ids = [s.statement_id or None for s in statements] + [sid for sid, _, _ in known]
        texts = [s.text for s in statements] + [text for _, text, _ in known]
        matrix = np.concatenate([text_vectors] + [v[None, :] for _, _, v in known]).astype(np.float32)
        similarities = matrix @ user_vector.astype(np.float32)
        probabilities = service.probabilities(similarities)
        explanations: list[list[ChunkContributionOut] | None] = [None] * len(similarities)
        if body.explain:
            explanations = [[ChunkContributionOut(**vars(c)) for c in row]
                            for row in await explain_scores(service.backend, pooled, matrix, body.explain_top)]
        return ScoreResponse(
            model_fingerprint=service.model_fingerprint, calibrated=service.calibrator is not None,
            index_version=index_version, explanation_method="leave_one_out" if body.explain else None,
            scores=[ScoredStatement(statement_id=sid, text=text, similarity=float(sim), probability=p, explanation=e)
                    for sid, text, sim, p, e in zip(ids, texts, similarities, probabilities, explanations,
                                                    strict=True)],
        )

    @app.post("/retrieve", response_model=RetrieveResponse, **KEY_IF_USER_ID)
    async def retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
        if body.user is not None:
            check_user(body.user, limits)
        k = min(10, limits.max_top_k) if body.k is None else body.k
        if k > limits.max_top_k:
            raise over_limit("k", k, "statements", limits.max_top_k)
        index = service.loaded_index()  # one reference: the whole request uses this version
        user_vector, _ = await the_user(request, body.user, body.user_id)
        hits = index.search(user_vector[None, :], k)[0]
        probabilities = service.probabilities(np.array([score for _, _, score in hits]))
        return RetrieveResponse(
            model_fingerprint=service.model_fingerprint, calibrated=service.calibrator is not None,
            index_version=index.version, k=k,
            scores=[ScoredStatement(statement_id=sid, text=text, similarity=score, probability=p)
                    for (sid, text, score), p in zip(hits, probabilities, strict=True)],
        )

    @app.get("/v1/models", response_model=OpenAIModelList)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "uue"} for name in model_names
        ]}

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, **KEY_IF_USER_ID)
    async def openai_embeddings(body: OpenAIEmbeddingsRequest, request: Request) -> dict[str, Any]:
        texts = body.texts()
        if body.model not in model_names:
            raise RequestError(404, f"model {body.model!r} not found; this server has "
                                    f"{service.statement_model_name!r} (statements) and "
                                    f"{service.user_model_name!r} (each input is one user's history)", "model")
        if body.dimensions is not None and body.dimensions != service.dimension:
            raise RequestError(400, f"dimensions: this model produces {service.dimension}-dimensional vectors "
                                    f"and cannot shorten them, got {body.dimensions}", "dimensions")
        check_statement_texts(texts, limits, "input")
        if body.input_type == "user_id":
            users = authorize(service, request, write=False)
            if body.model != service.user_model_name:
                raise RequestError(404, f"model {body.model!r} has no stored users: input_type user_id takes "
                                        f"model {service.user_model_name!r}", "model")
            vectors = []
            for i, user_id in enumerate(texts):
                if not re.fullmatch(USER_ID_PATTERN, user_id):  # cannot have been stored
                    raise RequestError(404, f"input.{i}: user {user_id!r} is not stored", f"input.{i}")
                vectors.append((await users.stored(user_id)).vector)
            prompt_tokens = 0
        elif body.model == service.statement_model_name:
            vectors, tokens = await service.backend.embed_statements([Statement("", t) for t in texts])
            count("statements", len(texts))
            prompt_tokens = int(sum(tokens))
        else:
            vectors = await service.backend.embed_users([UserData("", [UserChunk(t)]) for t in texts])
            count("users", len(texts))
            prompt_tokens = 0  # the user tower does not report tokens; usage counts statements only
        return {
            "object": "list",
            "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": _openai_vector(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }

    # The token is declared when there is one; without one the route answers loopback clients, no key needed.
    admin_security = [Security(ADMIN_TOKEN)] if service.admin_token else []

    @app.post("/admin/reload-index", response_model=ReloadIndexResponse, responses=ADMIN_RESPONSES,
              dependencies=admin_security)
    async def reload_index(request: Request) -> dict[str, Any]:
        check_admin(request, service.admin_token)
        if service.index is None:
            raise RequestError(409, "no statement index configured: start the server with `index` set")
        try:
            swapped = await asyncio.to_thread(service.index.refresh)
        except Exception as err:
            raise RequestError(409, f"index not swapped, still serving "
                                    f"{service.index.status()['version']}: {err}") from None
        if metrics is not None and service.index.current is not None:
            metrics.record_index(len(service.index.current), swapped)
        return {"swapped": swapped, **service.index.status()}

    add_user_routes(app, service)
    return app
