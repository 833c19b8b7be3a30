"""Ray Data preprocessing: data-contract folder -> validated, chunked, tokenized Parquet shards + manifest.

The pipeline, per table (users, statements, labels):

1. read: `ray.data.read_binary_files` over the table's files (NAME.jsonl, NAME.parquet or NAME/ shards;
   local paths or any pyarrow filesystem URI such as s3://, gs://, file://);
2. validate: a `flat_map` turns each file into one row per record, parsed by the same
   `uue.data.schema.parse_*` functions the local readers use, so a bad record gets the same
   (file, row, field, reason) here as in `load_dataset`; duplicate ids and labels that reference an
   unknown or rejected user/statement are rejected too;
3. chunk + tokenize: `map_batches` with an autoscaled actor pool of `Featurizer`s (tokenizers load once per
   actor); over-long history texts are split into token-bounded chunks first (`uue.data.chunking`);
4. write: the training input (`uue.data.shards`): `users/` (ragged chunk tokens, no padding, and each user's
   training-split positives and labels as statement indices), `statements/` (ragged tokens, indexed in id
   order), validated `labels/`, `rejects.jsonl` (every rejected record with its reason) and `manifest.json`
   (the tokenizer/config fingerprint training checks, counts).

Each user's training labels meet the user's record in a Ray Data `groupby("user_id").map_groups` over the
users and labels together (a hash shuffle among Ray workers): the driver never holds the labels, so its
memory does not grow with them (bench/bench_data_scale.py's labels row).

Nothing is dropped silently: read = written + rejected for every table, and the manifest says so.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uue.config import ExperimentConfig, ModelConfig
from uue.data.featurize import Featurizer
from uue.data.readers import path_inside, resolve_filesystem, table_files
from uue.data.schema import PARSERS, TABLES, TO_RECORD, DataValidationError, parse_statement, parse_user
from uue.data.shards import (
    MANIFEST,
    REJECTS,
    STATEMENT_SCHEMA,
    USER_SCHEMA,
    UserLabels,
    list_parquet,
    manifest_dict,
    statement_rows,
    user_row,
)

_KEY_FIELD = {"users": "user_id", "statements": "statement_id"}
USERS_PER_GROUP_PARTITION = 1_000  # users (records + labels) per partition of the label groupby's shuffle
# Rows of the label groupby: a user's own row (statement_index -1, its record) and one per training label.
_GROUP_SCHEMA = pa.schema([("user_id", pa.string()), ("record", pa.string()), ("statement_index", pa.int64()),
                           ("label", pa.int64()), ("file_rank", pa.int64()), ("row", pa.int64())])
_USER_WITH_LABELS_SCHEMA = pa.schema([("record", pa.string()), ("label_statements", pa.list_(pa.int64())),
                                      ("label_values", pa.list_(pa.int64()))])


# ---------------------------------------------------------------------------------- filesystems
def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


# ---------------------------------------------------------------------------------- reading + validation
def _records_of_file(raw: bytes, path: str) -> Iterator[tuple[int, dict[str, Any] | DataValidationError]]:
    """(row, record) for every record of one file; rows count from 1 (JSONL: the line number)."""
    if path.endswith(".jsonl"):
        for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, DataValidationError(path, line_no, "<json>", f"malformed JSON: {err.msg}")
                continue
            if not isinstance(record, dict):
                yield line_no, DataValidationError(path, line_no, "<json>", "a record must be a JSON object")
                continue
            yield line_no, record
    else:
        try:
            table = pq.read_table(pa.BufferReader(raw))
        except pa.ArrowInvalid as err:
            yield 0, DataValidationError(path, 0, "<parquet>", f"unreadable Parquet file: {err}")
            return
        for row_no, record in enumerate(table.to_pylist(), start=1):
            yield row_no, {k: v for k, v in record.items() if v is not None}


def _validate_file(row: dict[str, Any], table: str, display: dict[str, str], file_rank: dict[str, int]) -> list[dict]:
    """One file of a table -> one row per record: the normalised record, or the reason it is rejected."""
    path = display.get(row["path"], row["path"])
    out = []
    for row_no, record in _records_of_file(row["bytes"], path):
        base = {"file": path, "file_rank": file_rank.get(row["path"], 0), "row": row_no}
        if isinstance(record, DataValidationError):
            out.append({**base, "ok": False, "key": None, "record": None, "field": record.field,
                        "reason": record.reason})
            continue
        try:
            parsed = PARSERS[table](record, path, row_no)
        except DataValidationError as err:
            out.append({**base, "ok": False, "key": None, "record": None, "field": err.field, "reason": err.reason})
            continue
        key = getattr(parsed, _KEY_FIELD[table]) if table in _KEY_FIELD else None
        out.append({**base, "ok": True, "key": key, "record": json.dumps(TO_RECORD[table](parsed)),
                    "field": None, "reason": None})
    return out


def _check_label_references(batch: dict[str, np.ndarray], user_ids: frozenset, statement_ids: frozenset
                            ) -> dict[str, np.ndarray]:
    """Labels must point at a user and a statement that passed validation."""
    ok, fields, reasons = batch["ok"].copy(), batch["field"].copy(), batch["reason"].copy()
    for i, raw in enumerate(batch["record"]):
        if not ok[i]:
            continue
        record = json.loads(raw)
        if record["user_id"] not in user_ids:
            ok[i], fields[i] = False, "user_id"
            reasons[i] = f"unknown user_id {record['user_id']!r} (not among the valid users)"
        elif record["statement_id"] not in statement_ids:
            ok[i], fields[i] = False, "statement_id"
            reasons[i] = f"unknown statement_id {record['statement_id']!r} (not among the valid statements)"
    return {**batch, "ok": ok, "field": fields, "reason": reasons}


# ---------------------------------------------------------------------------------- featurization
@functools.lru_cache(maxsize=4)
def _featurizer(model_config_json: str) -> Featurizer:
    """One Featurizer per process and config: tokenizers load once per actor or task worker."""
    from uue.data.tokenizers import load_tokenizer

    config = ModelConfig.model_validate_json(model_config_json)
    towers = config.towers
    return Featurizer(config, load_tokenizer(towers.user_model_name), load_tokenizer(towers.item_model_name))


# ---------------------------------------------------------------------------------- labels beside their user
def _user_group_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """Validated user records -> the user's own row of the label groupby."""
    n = len(batch["record"])
    return pa.table({"user_id": batch["key"], "record": batch["record"], "statement_index": np.full(n, -1),
                     "label": np.full(n, -1), "file_rank": batch["file_rank"], "row": batch["row"]},
                    schema=_GROUP_SCHEMA)


def _label_group_rows(batch: dict[str, np.ndarray], statement_index: dict[str, int], train_split: str | None
                      ) -> pa.Table:
    """Validated label records of the training split (every label when `train_split` is None) -> groupby rows."""
    records = [json.loads(raw) for raw in batch["record"]]
    keep = [i for i, r in enumerate(records) if train_split is None or r.get("split") == train_split]
    return pa.table({"user_id": [records[i]["user_id"] for i in keep], "record": [None] * len(keep),
                     "statement_index": [statement_index[records[i]["statement_id"]] for i in keep],
                     "label": [int(records[i]["label"]) for i in keep],
                     "file_rank": batch["file_rank"][keep], "row": batch["row"][keep]}, schema=_GROUP_SCHEMA)


def _user_with_labels(group: dict[str, np.ndarray]) -> pa.Table:
    """One user_id's group -> its record beside its training labels in input order (file, then row), the
    order `labels_by_user` sees them in `preprocess_local`. Ids are unique and every label's user is valid,
    so a group holds exactly one user row."""
    is_user = group["statement_index"] < 0
    order = np.lexsort((group["row"], group["file_rank"]))
    labels = order[~is_user[order]]
    users = np.flatnonzero(is_user)
    statements, values = group["statement_index"][labels].tolist(), group["label"][labels].tolist()
    return pa.table({"record": group["record"][users].tolist(), "label_statements": [statements] * len(users),
                     "label_values": [values] * len(users)}, schema=_USER_WITH_LABELS_SCHEMA)


def _users_with_labels(users, labels, statement_index: dict[str, int], train_split: str | None, num_users: int):
    """A dataset of (record, label_statements, label_values), one row per user, grouped inside Ray Data."""
    user_rows = users.map_batches(_user_group_rows, batch_format="numpy")
    label_rows = labels.map_batches(_label_group_rows, batch_format="numpy",
                                    fn_kwargs={"statement_index": statement_index, "train_split": train_split})
    partitions = max(1, -(-num_users // USERS_PER_GROUP_PARTITION))
    return user_rows.union(label_rows).groupby("user_id", num_partitions=partitions).map_groups(
        _user_with_labels, batch_format="numpy")


class UserFeaturizerUDF:
    """Actor-pool UDF: user records beside their training labels -> users-shard rows (ragged tokens + labels).

    Users carry most of the tokenizing work, so they get an autoscaled actor pool of their own. The rows are
    built by `uue.data.shards.user_row`, the function `uue train`'s local preprocessing uses too.
    """

    def __init__(self, model_config_json: str):
        self.featurizer = _featurizer(model_config_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for raw, statements, values in zip(batch["record"], batch["label_statements"], batch["label_values"],
                                           strict=True):
            statements, values = [int(s) for s in statements], [int(v) for v in values]
            labels = UserLabels([s for s, v in zip(statements, values, strict=True) if v == 1], statements, values)
            rows.append(user_row(parse_user(json.loads(raw)), self.featurizer, labels))
        return pa.Table.from_pylist(rows, schema=USER_SCHEMA)


def _statement_rows(batch: dict[str, np.ndarray], model_config_json: str, index: dict[str, int]) -> pa.Table:
    """Validated statement records -> statements-table rows (statements are few and short: plain tasks)."""
    statements = [parse_statement(json.loads(raw)) for raw in batch["record"]]
    rows = statement_rows(statements, _featurizer(model_config_json))
    for row in rows:
        row["statement_index"] = index[row["statement_id"]]
    return pa.Table.from_pylist(rows, schema=STATEMENT_SCHEMA)


def _label_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    records = [json.loads(raw) for raw in batch["record"]]
    return {
        "user_id": np.array([r["user_id"] for r in records]),
        "statement_id": np.array([r["statement_id"] for r in records]),
        "label": np.array([r["label"] for r in records], dtype=np.int64),
        "split": np.array([r["split"] for r in records], dtype=object),
        "group": np.array([r["group"] for r in records], dtype=object),
    }


# ---------------------------------------------------------------------------------- the job
@dataclass
class TableCounts:
    read: int = 0
    written: int = 0
    rejected: int = 0


@dataclass
class PreprocessReport:
    """What `preprocess` did; also written (with more detail) to the manifest."""

    output: str
    counts: dict[str, TableCounts] = field(default_factory=dict)
    rejects_path: str = ""
    manifest_path: str = ""
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_rejected(self) -> int:
        return sum(c.rejected for c in self.counts.values())

    def summary(self) -> str:
        lines = [f"preprocessed -> {self.output} in {self.seconds:.1f}s",
                 f"{'table':12s}{'read':>10s}{'written':>10s}{'rejected':>10s}"]
        for table, c in self.counts.items():
            lines.append(f"{table:12s}{c.read:>10d}{c.written:>10d}{c.rejected:>10d}")
        if self.total_rejected:
            lines.append(f"{self.total_rejected} rejected records with their reasons: {self.rejects_path}")
            for reason, count in sorted(self.reject_reasons.items(), key=lambda kv: -kv[1])[:10]:
                lines.append(f"  {count:6d} x {reason}")
        return "\n".join(lines)


def _reason_kind(reject: dict[str, Any]) -> str:
    """Group rejects for the summary by table, field and the reason without the offending value."""
    reason = str(reject["reason"]).split(":")[0].split("'")[0].split("(")[0].strip()
    return f"{reject['table']}.{reject['field']}: {reason}"


def _read_validated(input_uri: str, table: str):
    import ray.data

    files = table_files(input_uri, table)
    fs, _ = resolve_filesystem(input_uri)
    # table_files names URI files `scheme://path` (credentials and ?endpoint_override=... dropped, which keeps
    # them out of reports); the input's own filesystem opens them by path.
    inner = [path_inside(f) for f in files]
    display = dict(zip(inner, files, strict=True))
    file_rank = {p: i for i, p in enumerate(inner)}
    ds = ray.data.read_binary_files(inner, filesystem=fs, include_paths=True)
    return ds.flat_map(_validate_file, fn_kwargs={"table": table, "display": display, "file_rank": file_rank})


def _split_duplicates(validated, table: str) -> tuple[set[tuple[str, int]], list[dict], set[str]]:
    """First occurrence of an id wins (file order, then row); later ones become rejects."""
    rows = validated.filter(lambda r: bool(r["ok"])).select_columns(["file", "file_rank", "row", "key"]).take_all()
    rows.sort(key=lambda r: (r["file_rank"], r["row"]))
    first: dict[str, dict] = {}
    duplicates: set[tuple[str, int]] = set()
    rejects: list[dict] = []
    for r in rows:
        if r["key"] in first:
            seen = first[r["key"]]
            duplicates.add((r["file"], r["row"]))
            rejects.append({"table": table, "file": r["file"], "file_rank": r["file_rank"], "row": r["row"],
                            "field": _KEY_FIELD[table],
                            "reason": f"duplicate {_KEY_FIELD[table]} {r['key']!r} (first in {seen['file']}, "
                                      f"row {seen['row']})"})
        else:
            first[r["key"]] = r
    return duplicates, rejects, set(first)


def preprocess(
    input_uri: str,
    output_uri: str,
    config: ExperimentConfig | ModelConfig,
    *,
    max_actors: int = 2,
    batch_size: int = 64,
    overwrite: bool = False,
    train_split: str | None = None,
) -> PreprocessReport:
    """Run the whole pipeline on the connected Ray cluster (the caller runs `ray.init`).

    `train_split` (default: the config's data.train_split, else "train") picks the labels that become each
    user's positives and training labels in the users shards.
    """
    import ray.data
    from ray.data.aggregate import Count

    started = time.perf_counter()
    model_config = config.model if isinstance(config, ExperimentConfig) else config
    if train_split is None:
        train_split = config.data.train_split if isinstance(config, ExperimentConfig) else "train"
    out_fs, out_root = resolve_filesystem(output_uri)
    info = out_fs.get_file_info(out_root)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"output {output_uri} is a file; give a folder")
    if info.type == pafs.FileType.Directory:
        existing = out_fs.get_file_info(pafs.FileSelector(out_root, recursive=False))
        if existing and not overwrite:
            raise FileExistsError(f"output {output_uri} is not empty; pass --overwrite to replace it")
        out_fs.delete_dir_contents(out_root, missing_dir_ok=True)
    out_fs.create_dir(out_root, recursive=True)

    report = PreprocessReport(output=output_uri)
    rejects: list[dict] = []
    valid_ids: dict[str, set[str]] = {}
    good: dict[str, Any] = {}
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, max_actors))
    config_json = model_config.model_dump_json()
    featurizer = _featurizer(config_json)

    # 1. validate every table (labels against the valid users and statements)
    for table in TABLES:
        validated = _read_validated(input_uri, table)
        if table == "labels":
            validated = validated.map_batches(
                _check_label_references, batch_format="numpy",
                fn_kwargs={"user_ids": frozenset(valid_ids["users"]),
                           "statement_ids": frozenset(valid_ids["statements"])},
            )
        validated = validated.materialize()
        counts = TableCounts(read=validated.count())
        bad = validated.filter(lambda r: not r["ok"]).select_columns(
            ["file", "file_rank", "row", "field", "reason"]).take_all()
        rejects.extend({"table": table, **r} for r in bad)
        duplicates: set[tuple[str, int]] = set()
        if table in _KEY_FIELD:
            duplicates, duplicate_rejects, valid_ids[table] = _split_duplicates(validated, table)
            rejects.extend(duplicate_rejects)
        counts.rejected = len(bad) + len(duplicates)
        good[table] = validated.filter(
            lambda r, d=frozenset(duplicates): bool(r["ok"]) and (r["file"], r["row"]) not in d)
        report.counts[table] = counts

    # 2. statements: the table's row order is the sorted ids (labels and positives refer to it by index)
    statement_index = {sid: i for i, sid in enumerate(sorted(valid_ids["statements"]))}
    good["statements"].map_batches(_statement_rows, batch_size=batch_size, batch_format="numpy",
                                   fn_kwargs={"model_config_json": config_json, "index": statement_index}
                                   ).write_parquet(f"{out_root}/statements", filesystem=out_fs)
    # 3. labels: written as validated; the training split's (all of them when no label has a split) are grouped
    #    with their user's record by user_id inside Ray Data
    labels = good["labels"].map_batches(_label_columns, batch_format="numpy").materialize()
    labels.write_parquet(f"{out_root}/labels", filesystem=out_fs)
    has_splits = labels.aggregate(Count(on="split", ignore_nulls=True, alias_name="with_split"))["with_split"] > 0
    users = _users_with_labels(good["users"], good["labels"], statement_index, train_split if has_splits else None,
                               report.counts["users"].read - report.counts["users"].rejected)
    # 4. users: chunk + tokenize in the actor pool, each row with its user's training labels
    users.map_batches(UserFeaturizerUDF, fn_constructor_args=(config_json,), compute=pool, batch_size=batch_size,
                      batch_format="numpy").write_parquet(f"{out_root}/users", filesystem=out_fs)
    for table in TABLES:
        report.counts[table].written = sum(pq.ParquetFile(out_fs.open_input_file(p)).metadata.num_rows
                                           for p in list_parquet(out_fs, f"{out_root}/{table}"))
    user_stats = pq.read_table(list_parquet(out_fs, f"{out_root}/users"), filesystem=out_fs,
                               columns=["num_positives"]).column("num_positives").to_numpy()

    rejects.sort(key=lambda r: (TABLES.index(r["table"]), r["file_rank"], r["row"]))
    report.rejects_path = f"{output_uri.rstrip('/')}/{REJECTS}"
    _write_text(out_fs, f"{out_root}/{REJECTS}", "".join(
        json.dumps({k: r[k] for k in ("table", "file", "row", "field", "reason")}) + "\n" for r in rejects))
    report.reject_reasons = dict(Counter(_reason_kind(r) for r in rejects))
    report.seconds = time.perf_counter() - started
    report.manifest_path = f"{output_uri.rstrip('/')}/{MANIFEST}"
    counts = {"users": report.counts["users"].written, "train_users": int((user_stats > 0).sum()),
              "positives": int(user_stats.sum()), "statements": report.counts["statements"].written,
              "labels": report.counts["labels"].written, "rejected": report.total_rejected}
    files = {t: [p[len(out_root) + 1:] for p in list_parquet(out_fs, f"{out_root}/{t}")] for t in TABLES}
    manifest = manifest_dict(
        input_uri, featurizer, train_split, counts, files, report.seconds,
        tables={t: asdict(c) for t, c in report.counts.items()},
        rejects={"file": REJECTS, "count": report.total_rejected, "by_reason": report.reject_reasons})
    _write_text(out_fs, f"{out_root}/{MANIFEST}", json.dumps(manifest, indent=2) + "\n")
    return report
