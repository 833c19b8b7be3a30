"""The data contract (DESIGN.md section 3) as typed records, with validation that names the bad field.

`parse_user`, `parse_statement` and `parse_label` turn one raw record (a dict from JSONL or Parquet)
into a typed record or raise `DataValidationError(file, row, field, reason)`; readers and the Ray Data
preprocessing job both use them, so a bad record reads the same everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TABLES = ("users", "statements", "labels")
SPLITS = ("train", "validation", "test")


class DataValidationError(ValueError):
    """A record breaks the data contract. Carries where (file, row) and which field."""

    def __init__(self, file: str, row: int | None, field_name: str, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field_name, reason
        where = f"{file}, row {row}" if row is not None else file
        super().__init__(f"{where}: field {field_name!r}: {reason}")

    def __reduce__(self):
        # Pickle by the constructor's arguments, so the error crosses Ray task/actor boundaries intact.
        return type(self), (self.file, self.row, self.field, self.reason)


@dataclass
class UserChunk:
    """One piece of text a user wrote (a message, post, review or rating line)."""

    text: str
    platform: str | None = None
    timestamp: str | None = None


@dataclass
class UserData:
    """A user: their chunks, optionally the statements known true of them, and metadata."""

    user_id: str
    chunks: list[UserChunk]
    statements: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None


@dataclass
class Statement:
    """A natural-language statement about people, e.g. 'would enjoy a horror film'."""

    statement_id: str
    text: str
    context: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class Label:
    """Whether a statement is true (1) or known false (0) of a user."""

    user_id: str
    statement_id: str
    label: int
    split: str | None = None
    group: str | None = None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _require_str(record: dict, key: str, file: str, row: int | None, allow_empty: bool = False) -> str:
    if key not in record or _is_missing(record[key]):
        raise DataValidationError(file, row, key, "missing (required)")
    value = record[key]
    if isinstance(value, (int,)) and not isinstance(value, bool) and key.endswith("_id"):
        value = str(value)  # numeric ids are common in exported tables
    if not isinstance(value, str):
        raise DataValidationError(file, row, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataValidationError(file, row, key, "empty string")
    return value


def _optional(record: dict, key: str, file: str, row: int | None, kind: type, expected: str) -> Any:
    """The field's value when it is of `kind`, None when it is missing; anything else names what was expected."""
    value = record.get(key)
    if _is_missing(value):
        return None
    if not isinstance(value, kind):
        raise DataValidationError(file, row, key, f"expected {expected}, got {type(value).__name__}")
    return value


def _optional_str(record: dict, key: str, file: str, row: int | None) -> str | None:
    return _optional(record, key, file, row, str, "a string or null")


def _optional_mapping(record: dict, key: str, file: str, row: int | None) -> dict[str, Any] | None:
    return _optional(record, key, file, row, dict, "an object")


def _check_unknown(record: dict, allowed: set[str], file: str, row: int | None) -> None:
    unknown = set(record) - allowed
    if unknown:
        raise DataValidationError(file, row, sorted(unknown)[0], f"unknown field (allowed: {sorted(allowed)})")


def parse_user(record: dict[str, Any], file: str = "<users>", row: int | None = None) -> UserData:
    _check_unknown(record, {"user_id", "chunks", "metadata"}, file, row)
    user_id = _require_str(record, "user_id", file, row)
    chunks_raw = record.get("chunks")
    if _is_missing(chunks_raw) or not hasattr(chunks_raw, "__iter__") or isinstance(chunks_raw, (str, dict)):
        raise DataValidationError(file, row, "chunks", "expected a list of {text, platform, timestamp}")
    chunks: list[UserChunk] = []
    for i, chunk in enumerate(chunks_raw):
        where = f"chunks[{i}]"
        if not isinstance(chunk, dict):
            raise DataValidationError(file, row, where, f"expected an object, got {type(chunk).__name__}")
        _check_unknown(chunk, {"text", "platform", "timestamp"}, file, row)
        text = chunk.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataValidationError(file, row, f"{where}.text", "missing or empty text")
        timestamp = _optional_str(chunk, "timestamp", file, row)
        if timestamp is not None:
            try:
                datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
            except ValueError:
                raise DataValidationError(file, row, f"{where}.timestamp", f"not ISO-8601: {timestamp!r}") from None
        chunks.append(UserChunk(text=text, platform=_optional_str(chunk, "platform", file, row), timestamp=timestamp))
    if not chunks:
        raise DataValidationError(file, row, "chunks", "a user needs at least one chunk")
    return UserData(user_id=user_id, chunks=chunks, metadata=_optional_mapping(record, "metadata", file, row))


def parse_statement(record: dict[str, Any], file: str = "<statements>", row: int | None = None) -> Statement:
    _check_unknown(record, {"statement_id", "text", "context", "metadata"}, file, row)
    return Statement(
        statement_id=_require_str(record, "statement_id", file, row),
        text=_require_str(record, "text", file, row),
        context=_optional_str(record, "context", file, row),
        metadata=_optional_mapping(record, "metadata", file, row),
    )


def parse_label(record: dict[str, Any], file: str = "<labels>", row: int | None = None) -> Label:
    _check_unknown(record, {"user_id", "statement_id", "label", "split", "group"}, file, row)
    value = record.get("label")
    if isinstance(value, bool) or value not in (0, 1):
        raise DataValidationError(file, row, "label", f"expected 0 or 1, got {value!r}")
    split = _optional_str(record, "split", file, row)
    if split is not None and split not in SPLITS:
        raise DataValidationError(file, row, "split", f"expected one of {SPLITS}, got {split!r}")
    return Label(
        user_id=_require_str(record, "user_id", file, row),
        statement_id=_require_str(record, "statement_id", file, row),
        label=int(value),
        split=split,
        group=_optional_str(record, "group", file, row),
    )


def user_to_record(user: UserData) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "chunks": [{"text": c.text, "platform": c.platform, "timestamp": c.timestamp} for c in user.chunks],
        "metadata": user.metadata,
    }


def statement_to_record(statement: Statement) -> dict[str, Any]:
    return {"statement_id": statement.statement_id, "text": statement.text, "context": statement.context,
            "metadata": statement.metadata}


def label_to_record(label: Label) -> dict[str, Any]:
    return {"user_id": label.user_id, "statement_id": label.statement_id, "label": label.label,
            "split": label.split, "group": label.group}


PARSERS = {"users": parse_user, "statements": parse_statement, "labels": parse_label}
"""Each table's record parser (raw dict, file, row -> typed record)."""
TO_RECORD = {"users": user_to_record, "statements": statement_to_record, "labels": label_to_record}
"""Each table's typed record -> the contract's dict."""
