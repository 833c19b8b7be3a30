"""The HTTP API's request and response bodies, and the limits every request is checked against.

Types and empty text are checked by pydantic (422 naming the field); sizes against the configured
`RequestLimits` by `check_*` (422 naming the field and the bound, as for any value the OpenAPI document
rules out: it states these bounds). Nothing is silently cut: a request over a bound is rejected, not
truncated. Only a body over `max_request_bytes` gets 413 (the document cannot state a byte size).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, field_validator

from uue.data.schema import Statement, UserChunk, UserData
from uue.serving.settings import RequestLimits


class RequestError(Exception):
    """A request the server refuses: HTTP status, the offending field (dotted path) and why.

    `retry_after_s` (503: the service is temporarily unable) becomes the `Retry-After` header."""

    def __init__(self, status: int, message: str, param: str | None = None, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.retry_after_s = retry_after_s


LIMIT_KEY = "x-uue-limit"
"""Marks a schema bounded by a `RequestLimits` field; the app's OpenAPI document writes the configured bound
there (maxLength, maxItems or maximum). Over the bound the request gets 422, as any schema violation does."""
ENUM_KEY = "x-uue-enum"
"""Marks a value the served model fixes ("model_names": the OpenAI `model` names, "dimension": the only
`dimensions` it produces); the app's OpenAPI document lists the allowed values there (enum)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
              "\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff")
r"""Python's whitespace (`str.isspace`) plus JSON Schema's (ECMA-262 `\s` adds U+FEFF): regex engines disagree
on `\S`, so the documented pattern spells the class out and the server checks exactly these characters."""
NOT_WHITESPACE = "[^" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "]"


def _non_empty(value: str) -> str:
    if not value.strip(WHITESPACE):
        raise ValueError("must not be empty or whitespace")
    return value


Text = Annotated[str, AfterValidator(_non_empty), WithJsonSchema(
    {"type": "string", "minLength": 1, "pattern": NOT_WHITESPACE, LIMIT_KEY: "max_text_chars",
     "description": "Non-empty text (at least one non-whitespace character)."})]
"""A chunk, statement or input text: 422 when empty or whitespace or over `max_text_chars`."""


UNION_TAGS = ("string", "object", "list")
"""Tags of the text-or-object unions below: validation errors name only the member the value is (so
`{"text": ""}` gets "text: must not be empty", not also "should be a valid string"); error paths omit them."""


def _kind(value: Any) -> str:
    return "string" if isinstance(value, str) else "list" if isinstance(value, list) else "object"


def _text_or(model: Any) -> Any:
    return Annotated[Annotated[Text, Tag("string")] | Annotated[model, Tag("object")], Discriminator(_kind)]


def _limited(limit: str, **kwargs: Any) -> Any:
    return Field(json_schema_extra={LIMIT_KEY: limit}, **kwargs)


class ChunkIn(_Body):
    text: Text
    platform: str | None = None
    timestamp: str | None = Field(None, json_schema_extra={"format": "date-time"},
                                  description="ISO-8601 (RFC 3339 date-time, e.g. 2025-06-01T08:00:00Z; a plain "
                                              "date is accepted too)")

    @field_validator("timestamp")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"not ISO-8601: {value!r}") from None
        return value


class UserIn(_Body):
    """A user's history: chunks as {text, platform, timestamp} objects or plain strings."""

    user_id: str | None = None
    chunks: list[_text_or(ChunkIn)] = _limited("max_chunks_per_user", min_length=1)
    metadata: dict[str, Any] | None = None

    def to_user(self) -> UserData:
        chunks = [UserChunk(c) if isinstance(c, str) else UserChunk(c.text, c.platform, c.timestamp)
                  for c in self.chunks]
        return UserData(user_id=self.user_id or "", chunks=chunks, metadata=self.metadata)


class HistoryIn(_Body):
    """A stored user's history (PUT /users/{user_id}) or new chunks (POST /users/{user_id}/chunks); the id
    is the path's."""

    chunks: list[_text_or(ChunkIn)] = _limited("max_chunks_per_user", min_length=1)
    metadata: dict[str, Any] | None = None

    def to_user(self, user_id: str) -> UserData:
        chunks = [UserChunk(c) if isinstance(c, str) else UserChunk(c.text, c.platform, c.timestamp)
                  for c in self.chunks]
        return UserData(user_id=user_id, chunks=chunks, metadata=self.metadata)


class StatementIn(_Body):
    statement_id: str | None = None
    text: Text
    context: str | None = None
    metadata: dict[str, Any] | None = None

    def to_statement(self) -> Statement:
        return Statement(self.statement_id or "", self.text, self.context, self.metadata)


def as_statement(item: StatementIn | str) -> Statement:
    return Statement("", item) if isinstance(item, str) else item.to_statement()


class EmbedUsersRequest(_Body):
    users: list[UserIn] = _limited("max_users_per_request", min_length=1)


class EmbedStatementsRequest(_Body):
    statements: list[_text_or(StatementIn)] = _limited("max_statements_per_request", min_length=1)


USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,255}$"
"""A stored user's id: 1-256 letters, digits and . _ : @ - (not first), in paths and bodies alike."""
StoredUserId = Annotated[str, Field(pattern=USER_ID_PATTERN, description="a stored user's id "
                                    "(PUT /users/{user_id}); needs an API key")]


class ScoreRequest(_Body):
    """One user against statements given as texts and/or as ids of statements in the loaded index."""

    # Statements: at least one of the two lists. The user: exactly one of `user` (a history sent here) and
    # `user_id` (a stored user). Stated in the schema so that what it calls valid is accepted.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"anyOf": [{"required": ["statements"], "properties": {"statements": {"minItems": 1}}},
                   {"required": ["statement_ids"], "properties": {"statement_ids": {"minItems": 1}}}]},
        {"oneOf": [{"required": ["user"]}, {"required": ["user_id"]}]},
    ]})

    user: UserIn = None  # type: ignore[assignment]  (omitted, not null: the schema says UserIn)
    user_id: StoredUserId = None  # type: ignore[assignment]
    statements: list[_text_or(StatementIn)] = _limited("max_statements_per_request", default_factory=list)
    statement_ids: list[str] = _limited("max_statements_per_request", default_factory=list)
    explain: bool = Field(False, description="per statement, the chunks that contributed most (leave-one-out: "
                                              "the similarity minus the similarity without the chunk)")
    explain_top: int = Field(3, ge=1, le=64, description="chunks per statement in `explanation`")


class RetrieveRequest(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["user"]}, {"required": ["user_id"]}]})

    user: UserIn = None  # type: ignore[assignment]
    user_id: StoredUserId = None  # type: ignore[assignment]
    k: Annotated[int, _limited("max_top_k", ge=1)] | None = Field(
        None, description="statements to return (default: 10, or `max_top_k` when that is smaller)")


class EmbeddingsResponse(BaseModel):
    model_fingerprint: str
    dimension: int
    embeddings: list[list[float]]


class ChunkContributionOut(BaseModel):
    index: int
    """The chunk's position: in the request's `user.chunks`, or in `GET /users/{user_id}`'s `chunks`."""
    seq: int | None
    """A stored chunk's arrival number (null for a user sent inline)."""
    timestamp: str | None
    platform: str | None
    contribution: float
    """The statement's similarity minus its similarity to the same user without this chunk."""


class ScoredStatement(BaseModel):
    statement_id: str | None
    text: str
    similarity: float
    probability: float | None
    """Platt-calibrated P(statement true of user); null when the model folder has no calibration.json."""
    explanation: list[ChunkContributionOut] | None = None
    """With `explain: true`: the chunks that raised this score most, largest contribution first."""


class ScoreResponse(BaseModel):
    model_fingerprint: str
    calibrated: bool
    index_version: str | None
    scores: list[ScoredStatement]
    explanation_method: Literal["leave_one_out"] | None = None


class RetrieveResponse(ScoreResponse):
    k: int


class IndexStatus(BaseModel):
    location: str
    version: str | None
    count: int
    folder: str | None
    swaps: int
    last_error: str | None


class UserStoreHealth(BaseModel):
    backend: Literal["sqlite", "redis"]
    available: bool
    """Whether the store took a probe write lock (SQLite) or answered PING (Redis) within a second, just now."""
    error: str | None


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    """`degraded`: the user store is unavailable; the tower routes (and users sent inline) still serve, stored
    users get 503. The answer is 200 either way, so a readiness probe keeps routing the tower traffic."""
    model_fingerprint: str
    dimension: int
    calibrated: bool
    index: IndexStatus | None
    user_store: UserStoreHealth | None = None
    """null when no user store is configured."""


class ReloadIndexResponse(IndexStatus):
    swapped: bool


class OpenAIEmbeddingsRequest(_Body):
    """OpenAI `POST /v1/embeddings`: token-array inputs are not supported (send text)."""

    model_config = ConfigDict(extra="ignore")  # clients add fields (e.g. `user`) that change nothing here
    input: Annotated[Annotated[Text, Tag("string")] | Annotated[
        list[Text], _limited("max_statements_per_request", min_length=1), Tag("list")], Discriminator(_kind)]
    model: str = Field(json_schema_extra={ENUM_KEY: "model_names"},
                       description="uue-statements (statement vectors) or uue-users (each input is one user's "
                                   "history); another name gets 404")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(gt=0, json_schema_extra={ENUM_KEY: "dimension"})] | None = Field(
        None, description="the model's dimension (vectors cannot be shortened; another value gets 400)")
    input_type: Literal["text", "user_id"] = Field("text", description=(
        "user_id (with the users model): each input is a stored user's id, answered with its stored vector; "
        "needs an API key. An id not stored (or any id with the statements model) gets 404"))

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str
    """Floats, or with encoding_format=base64 the little-endian float32 bytes in base64."""


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[OpenAIEmbedding]
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every 4xx/5xx of this API has this body."""

    error: ErrorDetail


# ---------------------------------------------------------------------------- limits
OVER_LIMIT = 422
"""The status of a list, text or `k` over a configured bound: the document states the bound (maxItems,
maxLength, maximum), so it is a schema violation like any other (413 is for a body over max_request_bytes)."""


def over_limit(param: str, count: int, what: str, bound: int) -> RequestError:
    """`param: 5 chunks per user, at most 4 allowed` (422 naming the field and the bound)."""
    return RequestError(OVER_LIMIT, f"{param}: {count} {what}, at most {bound} allowed", param)


def _check_text(text: str, limits: RequestLimits, param: str) -> None:
    if len(text) > limits.max_text_chars:
        raise over_limit(param, len(text), "characters", limits.max_text_chars)


def check_user(user: UserIn, limits: RequestLimits, param: str = "user") -> None:
    where = f"{param}.chunks" if param else "chunks"
    if len(user.chunks) > limits.max_chunks_per_user:
        raise over_limit(where, len(user.chunks), "chunks per user", limits.max_chunks_per_user)
    for i, chunk in enumerate(user.chunks):
        _check_text(chunk if isinstance(chunk, str) else chunk.text, limits, f"{where}.{i}")


def check_users(users: list[UserIn], limits: RequestLimits, param: str = "users") -> None:
    if len(users) > limits.max_users_per_request:
        raise over_limit(param, len(users), "users per request", limits.max_users_per_request)
    for i, user in enumerate(users):
        check_user(user, limits, f"{param}.{i}")


def check_statement_texts(texts: list[str], limits: RequestLimits, param: str = "statements") -> None:
    if len(texts) > limits.max_statements_per_request:
        raise over_limit(param, len(texts), "statements per request", limits.max_statements_per_request)
    for i, text in enumerate(texts):
        _check_text(text, limits, f"{param}.{i}")
