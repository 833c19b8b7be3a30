"""The HTTP API's request and response bodies, and the limits every request is checked against.

Types and empty text are checked by pydantic (422 naming the field); sizes against the configured
`RequestLimits` by `check_*` (413/422 naming the field and the bound). Nothing is silently cut: a
request over a bound is rejected, not truncated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from uue.data.schema import Statement, UserChunk, UserData
from uue.serving.settings import RequestLimits


class RequestError(Exception):
    """A request the server refuses: HTTP status, the offending field (dotted path) and why."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class ChunkIn(_Body):
    text: str
    platform: str | None = None
    timestamp: str | None = None

    _text = field_validator("text")(_non_empty)

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
    chunks: list[ChunkIn | str] = Field(min_length=1)
    metadata: dict[str, Any] | None = None

    @field_validator("chunks")
    @classmethod
    def _chunk_text(cls, chunks: list[ChunkIn | str]) -> list[ChunkIn | str]:
        for i, chunk in enumerate(chunks):
            if isinstance(chunk, str) and not chunk.strip():
                raise ValueError(f"chunk {i} is empty or whitespace")
        return chunks

    def to_user(self) -> UserData:
        chunks = [UserChunk(c) if isinstance(c, str) else UserChunk(c.text, c.platform, c.timestamp)
                  for c in self.chunks]
        return UserData(user_id=self.user_id or "", chunks=chunks, metadata=self.metadata)


class StatementIn(_Body):
    statement_id: str | None = None
    text: str
    context: str | None = None
    metadata: dict[str, Any] | None = None

    _text = field_validator("text")(_non_empty)

    def to_statement(self) -> Statement:
        return Statement(self.statement_id or "", self.text, self.context, self.metadata)


def as_statement(item: StatementIn | str) -> Statement:
    return Statement("", item) if isinstance(item, str) else item.to_statement()


class EmbedUsersRequest(_Body):
    users: list[UserIn] = Field(min_length=1)


class EmbedStatementsRequest(_Body):
    statements: list[StatementIn | str] = Field(min_length=1)

    @field_validator("statements")
    @classmethod
    def _texts(cls, items: list[StatementIn | str]) -> list[StatementIn | str]:
        for i, item in enumerate(items):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"statement {i} is empty or whitespace")
        return items


class ScoreRequest(EmbedStatementsRequest):
    """One user against statements given as texts and/or as ids of statements in the loaded index."""

    user: UserIn | None = None
    user_id: str | None = Field(None, description="A stored user (PUT /users/{user_id}) instead of `user`; "
                                                  "needs an API key")
    statements: list[StatementIn | str] = Field(default_factory=list)
    statement_ids: list[str] = Field(default_factory=list)
    explain: bool = False
    """Per statement, the chunks that contributed most (leave-one-out: score minus score without the chunk)."""
    explain_top: int = Field(3, ge=1, le=64)


class RetrieveRequest(_Body):
    user: UserIn | None = None
    user_id: str | None = Field(None, description="A stored user instead of `user`; needs an API key")
    k: int = Field(10, ge=1)


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


class OpenAIEmbeddingsRequest(_Body):
    """OpenAI `POST /v1/embeddings`: token-array inputs are not supported (send text)."""

    model_config = ConfigDict(extra="ignore")  # clients add fields (e.g. `user`) that change nothing here
    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    input_type: Literal["text", "user_id"] = Field("text", description=(
        "user_id (with the users model): each input is a stored user's id, answered with its stored vector; "
        "needs an API key"))

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise RequestError(422, "input: must not be an empty list", "input")
        for i, text in enumerate(items):
            if not text.strip():
                raise RequestError(422, f"input[{i}]: must not be empty or whitespace", f"input.{i}")
        return items


# ---------------------------------------------------------------------------- limits
def _check_text(text: str, limits: RequestLimits, param: str) -> None:
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"{param}: {len(text)} characters, at most {limits.max_text_chars} allowed", param)


def check_user(user: UserIn, limits: RequestLimits, param: str = "user") -> None:
    where = f"{param}.chunks" if param else "chunks"
    if len(user.chunks) > limits.max_chunks_per_user:
        raise RequestError(
            413, f"{where}: {len(user.chunks)} chunks, at most {limits.max_chunks_per_user} per user allowed", where,
        )
    for i, chunk in enumerate(user.chunks):
        _check_text(chunk if isinstance(chunk, str) else chunk.text, limits, f"{where}.{i}")


def check_users(users: list[UserIn], limits: RequestLimits, param: str = "users") -> None:
    if len(users) > limits.max_users_per_request:
        raise RequestError(
            413, f"{param}: {len(users)} users, at most {limits.max_users_per_request} per request allowed", param
        )
    for i, user in enumerate(users):
        check_user(user, limits, f"{param}.{i}")


def check_statement_texts(texts: list[str], limits: RequestLimits, param: str = "statements") -> None:
    if len(texts) > limits.max_statements_per_request:
        raise RequestError(
            413, f"{param}: {len(texts)} statements, at most {limits.max_statements_per_request} per request allowed",
            param,
        )
    for i, text in enumerate(texts):
        _check_text(text, limits, f"{param}.{i}")
