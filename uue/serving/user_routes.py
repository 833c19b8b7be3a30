"""HTTP routes of stored users (issue 13), added to the app by `build_http_app`:

    PUT    /users/{user_id}          {"chunks": [...], "metadata": {...}}  replace the whole history
    POST   /users/{user_id}/chunks   {"chunks": [...]}    append: only these chunks are encoded
    GET    /users/{user_id}          the stored vector and the kept chunks' timestamps, platforms, hashes
    DELETE /users/{user_id}          every stored trace of the user removed

All need `Authorization: Bearer <API key>` (writes and deletes a key without `:ro`); the key is checked
before the body is read, so a refused request changes nothing. /score, /retrieve and /v1/embeddings take
a stored `user_id` through `stored_user` (a read); `KEY_IF_USER_ID` documents their optional key.

An append may send `Idempotency-Key`: a retry with the same key (after a 503 or a lost reply) appends nothing
if the first attempt landed, and answers the stored user with `Idempotent-Replayed: true`.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures below at runtime, and their
# `Reader`/`Writer` dependencies are local to `add_user_routes` (string annotations would not resolve).
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, Request, Response, Security
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from uue.serving.api import USER_ID_PATTERN, ErrorBody, HistoryIn, RequestError, check_user
from uue.serving.auth import API_KEY, ApiKeys
from uue.serving.settings import RequestLimits
from uue.serving.user_store import UserState
from uue.serving.users import PooledUser, UserService


class UserRoutesService(Protocol):
    """What these routes read of the app's service (uue.serving.http.ServingService, which imports them)."""

    users: UserService | None
    api_keys: ApiKeys
    limits: RequestLimits
    dimension: int


UserId = Annotated[str, PathParam(pattern=USER_ID_PATTERN, description=(
    "1-256 characters: letters, digits and . _ : @ - (not first)."))]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", pattern=r"^[!-~]{1,255}$", description=(
    "Any unique string per append (a UUID): a retry with the same key and body appends nothing if the first "
    "attempt landed. Kept with the user for its last 100 keyed appends."))]
KeyHeader = Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)]
"""Declares the API-key scheme on a route (OpenAPI `security`); `ApiKeys.check` reads the header itself."""
REPLAYED = "Idempotent-Replayed"


class StoredChunkOut(BaseModel):
    index: int
    """Position in the stored history (what explanations call `index`)."""
    seq: int
    """Arrival number within the user; never reused until the user is deleted."""
    timestamp: str | None
    platform: str | None
    text_hash: str
    """blake2b-128 of the chunk's text (keyed when the server has a hash key); the text is not kept."""


class StoredUserResponse(BaseModel):
    user_id: str
    model_fingerprint: str
    dimension: int
    embedding: list[float]
    version: int
    """Bumped by every write."""
    updated_at: float
    num_chunks: int
    chunks: list[StoredChunkOut]


class DeletedUserResponse(BaseModel):
    user_id: str
    deleted: bool
    """False when the user was not stored (deleting is idempotent)."""


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_NO_KEY = _error_doc("Missing or unknown API key (`Authorization: Bearer <key>`).")
_READ_ONLY = _error_doc("A read-only (`:ro`) API key on a route that writes or deletes.")
_OTHER_MODEL = "The user was stored by another model (PUT its history again)"
_RACE = "lost a write race to concurrent writers too often (retry)"
READ_RESPONSES: dict[int | str, dict[str, Any]] = {401: _NO_KEY, 409: _error_doc(f"{_OTHER_MODEL}.")}
PUT_RESPONSES: dict[int | str, dict[str, Any]] = {401: _NO_KEY, 403: _READ_ONLY,
                                                  409: _error_doc(f"The write {_RACE}.")}
APPEND_RESPONSES: dict[int | str, dict[str, Any]] = {401: _NO_KEY, 403: _READ_ONLY,
                                                     409: _error_doc(f"{_OTHER_MODEL}, or the write {_RACE}.")}
DELETE_RESPONSES: dict[int | str, dict[str, Any]] = {401: _NO_KEY, 403: _READ_ONLY}
"""The stored-user errors each route can answer, on top of the app's common ones (404 there also means a user
not stored, 422 an Idempotency-Key reused for another append, 503 the store unavailable or none configured);
bodies are the app's error shape."""

KEY_IF_USER_ID: dict[str, Any] = {
    "dependencies": [Security(API_KEY)],
    "openapi_extra": {"security": [{}]},  # with FastAPI's [{"ApiKey": []}]: the key is optional
    "responses": {401: _error_doc("`user_id` without a valid API key (`Authorization: Bearer <key>`)."),
                  409: _error_doc(f"{_OTHER_MODEL}.")},
}
"""Route options of /score, /retrieve and /v1/embeddings: a key only when they read a stored user."""


def user_service(service: UserRoutesService) -> UserService:
    if service.users is None:
        raise RequestError(503, "no user store configured on this server (ServeArgs.user_store)", "user_id")
    return service.users


def authorize(service: UserRoutesService, request: Request, write: bool) -> UserService:
    users = user_service(service)
    service.api_keys.check(request.headers.get("authorization"), write=write)
    return users


async def stored_user(service: UserRoutesService, request: Request, user_id: str) -> PooledUser:
    """A stored user for /score, /retrieve, /v1/embeddings (needs a key; reading suffices)."""
    return await authorize(service, request, write=False).stored(user_id)


def _response(state: UserState, dimension: int) -> StoredUserResponse:
    return StoredUserResponse(
        user_id=state.user_id, model_fingerprint=state.model_fingerprint, dimension=dimension,
        embedding=[float(x) for x in state.vector], version=state.version, updated_at=state.updated_at,
        num_chunks=len(state.chunks),
        chunks=[StoredChunkOut(index=i, seq=c.seq, timestamp=c.timestamp, platform=c.platform, text_hash=c.text_hash)
                for i, c in enumerate(state.chunks)],
    )


def add_user_routes(app: FastAPI, service: UserRoutesService) -> None:
    def reader(request: Request, _: KeyHeader) -> UserService:
        return authorize(service, request, write=False)

    def writer(request: Request, _: KeyHeader) -> UserService:
        return authorize(service, request, write=True)

    # Dependencies run before the body is validated: a refused key never gets as far as the store.
    Reader = Annotated[UserService, Depends(reader)]
    Writer = Annotated[UserService, Depends(writer)]

    def history(body: HistoryIn) -> None:
        check_user(body, service.limits, "")  # type: ignore[arg-type]  (chunks, as a UserIn has)

    @app.put("/users/{user_id}", response_model=StoredUserResponse, responses=PUT_RESPONSES, tags=["users"])
    async def put_user(user_id: UserId, body: HistoryIn, users: Writer) -> StoredUserResponse:
        """Replace the user's whole history; its kept chunks (the `num_chunks_per_user` most recent) are encoded."""
        history(body)
        return _response(await users.put(user_id, body.to_user(user_id)), service.dimension)

    replayed_doc = {"description": "The stored user after the append.", "headers": {REPLAYED: {
        "description": "`true` when an earlier request with this Idempotency-Key had landed: nothing was appended.",
        "schema": {"type": "string", "enum": ["true"]}}}}

    @app.post("/users/{user_id}/chunks", response_model=StoredUserResponse,
              responses={200: replayed_doc, **APPEND_RESPONSES}, tags=["users"])
    async def append_chunks(user_id: UserId, body: HistoryIn, users: Writer, response: Response,
                            idempotency_key: IdempotencyKey = None) -> StoredUserResponse:
        """Append chunks (creating the user if new): only they are encoded, the vector is re-pooled from the
        stored chunk vectors, the oldest chunks beyond `num_chunks_per_user` are evicted. `metadata`, when
        given, replaces the stored metadata. Retry a 503 with the same `Idempotency-Key`."""
        history(body)
        user = body.to_user(user_id)
        state = await users.append(user_id, user.chunks, user.metadata, request_key=idempotency_key)
        if state.replayed:
            response.headers[REPLAYED] = "true"
        return _response(state, service.dimension)

    @app.get("/users/{user_id}", response_model=StoredUserResponse, responses=READ_RESPONSES, tags=["users"])
    async def get_user(user_id: UserId, users: Reader) -> StoredUserResponse:
        return _response(await users.get(user_id), service.dimension)

    @app.delete("/users/{user_id}", response_model=DeletedUserResponse, responses=DELETE_RESPONSES,
                tags=["users"])
    async def delete_user(user_id: UserId, users: Writer) -> DeletedUserResponse:
        """Remove every stored trace of the user (chunk vectors, hashes, metadata, vector)."""
        return DeletedUserResponse(user_id=user_id, deleted=await users.delete(user_id))
