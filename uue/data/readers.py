"""Read and write data-contract folders (JSONL, Parquet, or folders of shards; local paths or URIs)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uue.data.schema import (
    TABLES,
    TO_RECORD,
    DataValidationError,
    Label,
    Statement,
    UserData,
    parse_label,
    parse_statement,
    parse_user,
)

SHARD_SUFFIXES = (".jsonl", ".parquet")


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI that pyarrow understands; a URI's credentials
    and query options (`?endpoint_override=...&region=...`) configure the filesystem."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def path_inside(file: str) -> str:
    """The path of a file named by `table_files` inside its folder's filesystem (drops `scheme://`)."""
    return file.split("://", 1)[1] if "://" in file else file


def table_files(folder: str, name: str) -> list[str]:
    """The files holding table `name` in `folder`: NAME.jsonl, NAME.parquet, or shards under NAME/."""
    fs, root = resolve_filesystem(folder)
    found = []
    for suffix in SHARD_SUFFIXES:
        info = fs.get_file_info(f"{root}/{name}{suffix}")
        if info.type == pafs.FileType.File:
            found.append(info.path)
    shard_dir = fs.get_file_info(f"{root}/{name}")
    if shard_dir.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(shard_dir.path, recursive=False))
        found.extend(sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(SHARD_SUFFIXES)))
    if not found:
        raise FileNotFoundError(
            f"no {name!r} table in {folder}: expected {name}.jsonl, {name}.parquet or a folder {name}/ of shards"
        )
    # Files are named `scheme://path`, without the folder URI's credentials and query options (which keeps
    # them out of error messages and reports): open them with the folder's filesystem (`path_inside`).
    return [f if "://" not in folder else f"{folder.split('://')[0]}://{f}" for f in found]


def iter_records(folder: str, name: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (file, row, record) for table `name`; rows count from 1 (JSONL: the line number)."""
    fs, _ = resolve_filesystem(folder)
    for path in table_files(folder, name):
        yield from iter_file_records(path, filesystem=fs)


def iter_file_records(path: str, filesystem: pafs.FileSystem | None = None
                      ) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (file, row, record) for one .jsonl or .parquet file: a local path or URI, or a file named by
    `table_files` opened with its folder's `filesystem`."""
    fs, inner = (filesystem, path_inside(path)) if filesystem is not None else resolve_filesystem(path)
    if path.endswith(".jsonl"):
        with fs.open_input_stream(inner) as stream:
            for line_no, raw in enumerate(stream.read().decode("utf-8").splitlines(), start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise DataValidationError(path, line_no, "<json>", f"malformed JSON: {err.msg}") from None
                if not isinstance(record, dict):
                    raise DataValidationError(path, line_no, "<json>", "a record must be a JSON object")
                yield path, line_no, record
    elif path.endswith(".parquet"):
        table = pq.read_table(inner, filesystem=fs)
        for row_no, record in enumerate(table.to_pylist(), start=1):
            yield path, row_no, {k: v for k, v in record.items() if v is not None}
    else:
        raise ValueError(f"{path}: unsupported file type (expected {' or '.join(SHARD_SUFFIXES)})")


@dataclass
class UUEDataset:
    """A loaded data-contract folder: users and statements by id, and labels."""

    users: dict[str, UserData]
    statements: dict[str, Statement]
    labels: list[Label] = field(default_factory=list)
    source: str = "<memory>"

    def labels_in(self, split: str | None) -> list[Label]:
        """Labels of one split; with `split=None`, or a folder without splits, all labels."""
        if split is None or not self.has_splits:
            return list(self.labels)
        return [lab for lab in self.labels if lab.split == split]

    @property
    def has_splits(self) -> bool:
        return any(lab.split is not None for lab in self.labels)

    def positive_pairs(self, split: str | None) -> list[tuple[str, str]]:
        return [(lab.user_id, lab.statement_id) for lab in self.labels_in(split) if lab.label == 1]

    def groups(self) -> list[str]:
        return sorted({lab.group for lab in self.labels if lab.group is not None})


def _records_by_id(folder: str, table: str, parse: Callable[[dict, str, int], Any], id_field: str) -> dict[str, Any]:
    """A table's validated records by id; an id seen twice is an error naming both rows' file and field."""
    records: dict[str, Any] = {}
    for path, row, record in iter_records(folder, table):
        parsed = parse(record, path, row)
        key = getattr(parsed, id_field)
        if key in records:
            raise DataValidationError(path, row, id_field, f"duplicate {id_field} {key!r}")
        records[key] = parsed
    return records


def load_dataset(folder: str | Path) -> UUEDataset:
    """Read and validate all three tables; ids must be unique and labels must reference known records."""
    folder = str(folder)
    users: dict[str, UserData] = _records_by_id(folder, "users", parse_user, "user_id")
    statements: dict[str, Statement] = _records_by_id(folder, "statements", parse_statement, "statement_id")
    labels: list[Label] = []
    for path, row, record in iter_records(folder, "labels"):
        lab = parse_label(record, path, row)
        if lab.user_id not in users:
            raise DataValidationError(path, row, "user_id", f"unknown user_id {lab.user_id!r} (not in users)")
        if lab.statement_id not in statements:
            raise DataValidationError(
                path, row, "statement_id", f"unknown statement_id {lab.statement_id!r} (not in statements)"
            )
        labels.append(lab)
    statement_text = {sid: st.text for sid, st in statements.items()}
    for lab in labels:
        if lab.label == 1:
            users[lab.user_id].statements.append(statement_text[lab.statement_id])
    return UUEDataset(users, statements, labels, source=folder)




def write_table(folder: str | Path, name: str, records: Iterable[Any], fmt: str = "jsonl") -> Path:
    """Write one table as NAME.jsonl or NAME.parquet; typed records are converted to contract dicts."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; the contract has {TABLES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r if isinstance(r, dict) else TO_RECORD[name](r) for r in records]
    if fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        with path.open("w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"unknown format {fmt!r}: use 'jsonl' or 'parquet'")
    return path


def write_dataset(folder: str | Path, dataset: UUEDataset, fmt: str = "jsonl") -> Path:
    for name, records in (("users", dataset.users.values()), ("statements", dataset.statements.values()),
                          ("labels", dataset.labels)):
        write_table(folder, name, records, fmt)
    return Path(folder)


def dataset_from_users(users: Iterable[UserData], split: str | None = None) -> UUEDataset:
    """Build a dataset from seed-API `UserData` whose `statements` lists the texts true of each user."""
    by_id: dict[str, UserData] = {}
    statements: dict[str, Statement] = {}
    text_to_id: dict[str, str] = {}
    labels: list[Label] = []
    for user in users:
        if user.user_id in by_id:
            raise ValueError(f"duplicate user_id {user.user_id!r}")
        by_id[user.user_id] = user
        for text in user.statements:
            if text not in text_to_id:
                text_to_id[text] = f"s{len(text_to_id)}"
                statements[text_to_id[text]] = Statement(statement_id=text_to_id[text], text=text)
            labels.append(Label(user.user_id, text_to_id[text], 1, split))
    return UUEDataset(by_id, statements, labels)
