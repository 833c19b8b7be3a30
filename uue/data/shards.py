"""Preprocessed shards: the training input (one row per user, ragged tokens) and its manifest.

A preprocessed folder holds
    users/*.parquet        user_id, chunk_tokens (the most recent num_chunks_per_user chunks as ragged token-id
                           lists, no padding), user_metadata (hashed, when the model uses it), positives,
                           label_statements, label_values (the user's training-split labels as statement
                           indices), num_positives and the chunk counts preprocessing reports;
    statements/*.parquet   statement_index (row position in the statement table), statement_id, tokens,
                           item_metadata;
    labels/                the validated labels (evaluation reads them);
    manifest.json          format, the tokenizer/config fingerprint, the training split and counts;
    rejects.jsonl          every rejected record with its reason (Ray preprocessing).
Both writers (`preprocess_local` here, `uue.data.preprocess` on Ray) build rows with `user_row` and
`statement_rows`, so the two produce the same shards. Tokens are stored unpadded: padding happens per batch
(`uue.train.stream.collate_users`), to the batch's own longest chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from uue.config import SECTION_OF, ExperimentConfig, ModelConfig
from uue.data.chunking import split_long_chunks
from uue.data.featurize import Featurizer, hash_metadata
from uue.data.readers import UUEDataset, resolve_filesystem
from uue.data.schema import Label, Statement, UserData, label_to_record

FORMAT = "uue-preprocessed/2"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
ROWS_PER_FILE = 5_000

USER_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("chunk_tokens", pa.list_(pa.list_(pa.int32()))),
    ("user_metadata", pa.list_(pa.float32())),
    ("positives", pa.list_(pa.int32())),
    ("label_statements", pa.list_(pa.int32())),
    ("label_values", pa.list_(pa.int8())),
    ("num_positives", pa.int32()),
    ("num_chunks", pa.int32()),
    ("num_pieces", pa.int32()),
    ("num_kept", pa.int32()),
])
STATEMENT_SCHEMA = pa.schema([
    ("statement_index", pa.int32()),
    ("statement_id", pa.string()),
    ("tokens", pa.list_(pa.int32())),
    ("item_metadata", pa.list_(pa.float32())),
])


class PreprocessedMismatchError(ValueError):
    """A preprocessed folder was made with another tokenizer, other lengths or another training split."""


# ---------------------------------------------------------------------------------- fingerprint
def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """Name, class, size and a hash of the vocabulary: two tokenizers with one fingerprint make the same ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
    digest = hashlib.blake2b(vocab, digest_size=8).hexdigest()
    return f"{name}|{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.padding_side}|{digest}"


def fingerprint(featurizer: Featurizer) -> dict[str, Any]:
    """Everything that decides the stored token ids and metadata features."""
    cfg = featurizer.config
    return {
        "user_tokenizer": tokenizer_fingerprint(featurizer.user_tokenizer, cfg.towers.user_model_name),
        "item_tokenizer": tokenizer_fingerprint(featurizer.item_tokenizer, cfg.towers.item_model_name),
        # By the keys' own names, as manifests written before ModelConfig had sections recorded them.
        **{key: getattr(getattr(cfg, SECTION_OF[key]), key) for key in (
            "max_chunk_length", "num_chunks_per_user", "max_statement_length", "max_context_length",
            "use_user_metadata", "metadata_dim", "use_item_metadata", "item_metadata_dim")},
    }


def check_manifest(manifest: dict[str, Any], featurizer: Featurizer, train_split: str | None, where: str) -> None:
    """Refuse shards made for another model or split, naming every difference."""
    if manifest.get("format") != FORMAT:
        raise PreprocessedMismatchError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}; "
                                        "preprocess the raw data again")
    expected = fingerprint(featurizer)
    stored = manifest.get("fingerprint", {})
    diffs = [f"{key}: preprocessed with {stored.get(key)!r}, this config needs {value!r}"
             for key, value in expected.items() if stored.get(key) != value]
    if manifest.get("train_split") != train_split:
        diffs.append(f"train_split: preprocessed with {manifest.get('train_split')!r}, this config trains on "
                     f"{train_split!r}")
    if diffs:
        raise PreprocessedMismatchError(f"{where} does not fit this config (preprocess again with it):\n  "
                                        + "\n  ".join(diffs))


# ---------------------------------------------------------------------------------- rows
@dataclass
class UserLabels:
    """A user's training-split labels as statement indices."""

    positives: list[int]
    statements: list[int]
    values: list[int]


def labels_by_user(labels: Sequence[Label] | Sequence[dict], statement_index: Mapping[str, int],
                   train_split: str | None, has_splits: bool) -> dict[str, UserLabels]:
    """Group the training split's labels per user (all labels when the data has no split column)."""
    out: dict[str, UserLabels] = {}
    for lab in labels:
        record = label_to_record(lab) if isinstance(lab, Label) else lab
        if has_splits and train_split is not None and record.get("split") != train_split:
            continue
        entry = out.setdefault(record["user_id"], UserLabels([], [], []))
        index = statement_index[record["statement_id"]]
        entry.statements.append(index)
        entry.values.append(int(record["label"]))
        if int(record["label"]) == 1:
            entry.positives.append(index)
    return out


def user_row(user: UserData, featurizer: Featurizer, labels: UserLabels | None) -> dict[str, Any]:
    """One users-shard row: long texts split into token-bounded pieces, the most recent kept, unpadded."""
    cfg = featurizer.config
    pieces = split_long_chunks(user.chunks, featurizer.user_tokenizer, cfg.towers.max_chunk_length)
    tokens = featurizer.user_tokens(pieces)
    labels = labels or UserLabels([], [], [])
    return {
        "user_id": user.user_id,
        "chunk_tokens": tokens,
        "user_metadata": (hash_metadata(user.metadata, cfg.heads.metadata_dim).tolist()
                          if cfg.heads.use_user_metadata else None),
        "positives": sorted(set(labels.positives)),
        "label_statements": labels.statements,
        "label_values": labels.values,
        "num_positives": len(set(labels.positives)),
        "num_chunks": len(user.chunks),
        "num_pieces": len(pieces),
        "num_kept": len(tokens),
    }


def statement_rows(statements: Sequence[Statement], featurizer: Featurizer, first_index: int = 0) -> list[dict]:
    """Statements-table rows; `statement_index` is the row's position in the whole (id-sorted) table."""
    cfg = featurizer.config
    tokens = featurizer.statement_tokens(statements)
    return [{"statement_index": first_index + i, "statement_id": s.statement_id, "tokens": t,
             "item_metadata": hash_metadata(s.metadata, cfg.heads.item_metadata_dim).tolist()
             if cfg.heads.use_item_metadata else None}
            for i, (s, t) in enumerate(zip(statements, tokens, strict=True))]


def manifest_dict(input_uri: str, featurizer: Featurizer, train_split: str | None, counts: dict[str, Any],
                  files: dict[str, list[str]], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "input": input_uri, "created_unix": time.time(), "seconds": seconds,
            "fingerprint": fingerprint(featurizer), "train_split": train_split, "counts": counts,
            "model": featurizer.config.model_dump(), "files": files, **extra}


# ---------------------------------------------------------------------------------- local writer
def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def list_parquet(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def preprocess_local(dataset: UUEDataset, output_uri: str, config: ExperimentConfig | ModelConfig,
                     featurizer: Featurizer, train_split: str | None = "train",
                     rows_per_file: int = ROWS_PER_FILE) -> dict[str, Any]:
    """One process: an already validated dataset -> the shards Ray preprocessing writes (for `uue train`)."""
    started = time.perf_counter()
    fs, root = resolve_filesystem(output_uri)
    fs.delete_dir_contents(root, missing_dir_ok=True)
    for table in ("users", "statements", "labels"):
        fs.create_dir(f"{root}/{table}", recursive=True)
    statement_ids = sorted(dataset.statements)
    index = {sid: i for i, sid in enumerate(statement_ids)}
    rows = statement_rows([dataset.statements[s] for s in statement_ids], featurizer)
    pq.write_table(pa.Table.from_pylist(rows, schema=STATEMENT_SCHEMA), f"{root}/statements/part-00000.parquet",
                   filesystem=fs)
    by_user = labels_by_user(dataset.labels, index, train_split, dataset.has_splits)
    user_ids = sorted(dataset.users)
    train_users = positives = 0
    for part, start in enumerate(range(0, len(user_ids), rows_per_file)):
        batch = [user_row(dataset.users[u], featurizer, by_user.get(u)) for u in user_ids[start:start + rows_per_file]]
        train_users += sum(1 for r in batch if r["num_positives"])
        positives += sum(r["num_positives"] for r in batch)
        pq.write_table(pa.Table.from_pylist(batch, schema=USER_SCHEMA), f"{root}/users/part-{part:05d}.parquet",
                       filesystem=fs)
    pq.write_table(pa.Table.from_pylist([label_to_record(lab) for lab in dataset.labels]),
                   f"{root}/labels/part-00000.parquet", filesystem=fs)
    _write_text(fs, f"{root}/{REJECTS}", "")
    counts = {"users": len(user_ids), "train_users": train_users, "positives": positives,
              "statements": len(statement_ids), "labels": len(dataset.labels), "rejected": 0}
    files = {t: [p[len(root) + 1:] for p in list_parquet(fs, f"{root}/{t}")] for t in ("users", "statements", "labels")}
    manifest = manifest_dict(dataset.source, featurizer, train_split, counts, files, time.perf_counter() - started)
    _write_text(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------- reading
def is_preprocessed(folder: str) -> bool:
    fs, root = resolve_filesystem(folder)
    return fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File


@dataclass
class Shards:
    """An opened preprocessed folder: its manifest and files (nothing is read until asked)."""

    uri: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str) -> Shards:
        """Open `uri`; a local path is made absolute, since Ray workers read it from their own directory."""
        uri = uri if "://" in str(uri) else str(Path(uri).resolve())
        fs, root = resolve_filesystem(uri)
        path = f"{root}/{MANIFEST}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri} is not a preprocessed folder (no {MANIFEST}); run ray_jobs.preprocess")
        with fs.open_input_stream(path) as stream:
            return cls(uri, json.loads(stream.read().decode("utf-8")))

    @property
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return resolve_filesystem(self.uri)

    def files(self, table: str) -> list[str]:
        """Paths inside the folder's filesystem of one table's shards, in manifest order."""
        _, root = self.filesystem
        return [f"{root}/{name}" for name in self.manifest["files"][table]]

    @property
    def train_users(self) -> int:
        return int(self.manifest["counts"]["train_users"])

    @property
    def num_statements(self) -> int:
        return int(self.manifest["counts"]["statements"])

    def statements(self) -> dict[str, Any]:
        """The statement table in index order: ids, token lists, metadata (None when not stored)."""
        fs, _ = self.filesystem
        table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in self.files("statements")])
        table = table.sort_by("statement_index")
        index = table.column("statement_index").to_numpy()
        if not np.array_equal(index, np.arange(len(index))):
            raise ValueError(f"{self.uri}: statement_index is not 0..{len(index) - 1}")
        metadata = table.column("item_metadata").to_pylist()
        return {"statement_id": table.column("statement_id").to_pylist(),
                "tokens": table.column("tokens").to_pylist(),
                "item_metadata": None if metadata[0] is None else np.asarray(metadata, dtype=np.float32)}

    def iter_train_users(self, batch_rows: int = 256) -> Iterator[list[dict[str, Any]]]:
        """Training users (>= 1 positive) in file order, as lists of row dicts (what Ray Data's pyarrow
        batches become in the worker loop)."""
        fs, _ = self.filesystem
        for path in self.files("users"):
            table = pq.read_table(path, filesystem=fs, filters=TRAIN_USERS_FILTER)
            for batch in table.to_batches(max_chunksize=batch_rows):
                yield batch.to_pylist()


TRAIN_USERS_FILTER = pc.field("num_positives") > 0
