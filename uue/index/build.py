"""Batch indexing of statements: Ray Data runs the item tower in an autoscaled actor pool, the driver writes
the vectors as Parquet shards and builds a usearch HNSW index over them (the folder layout: uue.index.load).

`manifest.json` is what makes a folder an index: a build writes everything into a hidden staging folder
beside the output and renames it into place at the end, so a reader never sees half an index and an
interrupted build leaves the previous index (or nothing) at the output path. A rerun starts from scratch
rather than skipping statements already encoded: the encoder is deterministic, partial Parquet files of a
killed run may be truncated, and the ANN graph has to be rebuilt over every vector anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uue.data.readers import SHARD_SUFFIXES, iter_file_records, resolve_filesystem, table_files
from uue.data.schema import DataValidationError, Statement, parse_statement
from uue.index.load import ANN_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION, MANIFEST_FILE, METRIC, VECTORS_DIR, new_ann
from uue.model.folder import checkpoint_fingerprint, read_output_dim, read_tower_config, resolve_item_tower

if TYPE_CHECKING:
    from uue.config import ModelConfig

logger = logging.getLogger(__name__)

CONTRACT_COLUMNS = ("statement_id", "text")
_INDEX_ENTRIES = {MANIFEST_FILE, ANN_FILE, VECTORS_DIR}


# ---------------------------------------------------------------------------------------------- input
def input_files(input_uri: str, id_column: str = "statement_id", text_column: str = "text"
                ) -> tuple[list[str], bool, pafs.FileSystem]:
    """(files to read, whether they hold data-contract `statements` records, the filesystem that opens them).

    Files are named `scheme://path` (credentials and query options of the input URI left out); open them
    with the returned filesystem (`path_inside`), which carries those options.

    Contract records (a data-contract folder, or a file/folder named `statements`) are validated with
    `parse_statement`; any other .jsonl/.parquet file or folder of shards is read as a table whose
    `id_column` and `text_column` are used and other columns ignored.
    """
    uri = str(input_uri)
    fs, root = resolve_filesystem(uri)
    try:
        files, contract = table_files(uri, "statements"), True
    except FileNotFoundError:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            found = [info.path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(SHARD_SUFFIXES))
        else:
            raise FileNotFoundError(f"input {uri} does not exist") from None
        if not found:
            raise FileNotFoundError(
                f"input {uri}: no statements.jsonl/.parquet/statements/ table and no .jsonl or .parquet files"
            ) from None
        if not found[0].endswith(SHARD_SUFFIXES):
            expected = " or ".join(SHARD_SUFFIXES)
            raise ValueError(f"input {found[0]}: unsupported file type (expected {expected})") from None
        scheme = uri.split("://")[0] + "://" if "://" in uri else ""
        files = [scheme + f if scheme and "://" not in f else f for f in found]
        stem = Path(root.rstrip("/")).name.split(".")[0]
        contract = stem == "statements"
    if contract and (id_column, text_column) != CONTRACT_COLUMNS:
        raise ValueError(
            f"input {uri} holds data-contract statements (statement_id, text): id_column/text_column "
            f"({id_column!r}, {text_column!r}) apply only to other tables"
        )
    return files, contract, fs


def _table_statement(record: dict[str, Any], file: str, row: int, id_column: str, text_column: str) -> Statement:
    values = []
    for column in (id_column, text_column):
        value = record.get(column)
        if isinstance(value, int) and not isinstance(value, bool) and column == id_column:
            value = str(value)
        if value is None:
            raise DataValidationError(file, row, column, f"missing (required; columns: {sorted(record)})")
        if not isinstance(value, str):
            raise DataValidationError(file, row, column, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise DataValidationError(file, row, column, "empty string")
        values.append(value)
    return Statement(statement_id=values[0], text=values[1])


def read_statement_files(
    batch: dict[str, np.ndarray], contract: bool, id_column: str, text_column: str, rows_per_block: int,
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[dict[str, list]]:
    """Ray Data UDF: file paths -> validated statement rows (errors name the file, row and field).

    Missing context/metadata travel as "" so every block has the same string schema.
    """
    for path in batch["path"]:
        rows: dict[str, list] = {"statement_id": [], "text": [], "context": [], "metadata": [], "source": []}
        for file, row, record in iter_file_records(str(path), filesystem=filesystem):
            if contract:
                st = parse_statement(record, file, row)
            else:
                st = _table_statement(record, file, row, id_column, text_column)
            rows["statement_id"].append(st.statement_id)
            rows["text"].append(st.text)
            rows["context"].append(st.context or "")
            rows["metadata"].append(json.dumps(st.metadata, sort_keys=True) if st.metadata else "")
            rows["source"].append(f"{file}, row {row}")
            if len(rows["text"]) >= rows_per_block:
                yield rows
                rows = {key: [] for key in rows}
        if rows["text"]:
            yield rows


# ---------------------------------------------------------------------------------------------- encoding
def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return dtype


IndexAttention = Literal["model", "padded", "packed"]


def index_model_config(saved: ModelConfig, attention: IndexAttention = "model",
                       compile_layers: bool | None = None, pack_tokens: int | None = None) -> ModelConfig:
    """The item tower's saved ModelConfig with the index's encoding choices applied (and validated).

    attention "model" keeps what the tower was saved with (model.packing.attention; padded by default);
    compile_layers / pack_tokens None keep the model's values.
    """
    if attention not in ("model", "padded", "packed"):
        raise ValueError(f"index attention {attention!r}: use model, padded or packed")
    updates: dict[str, Any] = {}
    if attention != "model":
        updates["attention"] = attention
    if compile_layers is not None:
        updates["compile_layers"] = compile_layers
    if pack_tokens is not None:
        updates["pack_tokens"] = pack_tokens
    try:
        return saved.model_copy(update=updates)
    except ValueError as err:  # e.g. pack_tokens shorter than the longest statement
        raise ValueError(f"index encoding options {updates}: {err}") from None


def _batch_statements(batch: dict[str, np.ndarray]) -> list[Statement]:
    return [
        Statement(statement_id=str(sid), text=str(text), context=str(ctx) or None,
                  metadata=json.loads(meta) if meta else None)
        for sid, text, ctx, meta in zip(
            batch["statement_id"], batch["text"], batch["context"], batch["metadata"], strict=True)
    ]


@functools.lru_cache(maxsize=4)
def _featurizer(item_tower_folder: str) -> Any:
    """The tower's tokenizer + featurizer, loaded once per Ray worker process (tasks reuse their workers)."""
    from transformers import AutoTokenizer

    from uue.data.featurize import Featurizer

    tokenizer = AutoTokenizer.from_pretrained(Path(item_tower_folder) / "backbone")
    return Featurizer(read_tower_config(item_tower_folder), tokenizer, tokenizer)


def tokenize_statements(batch: dict[str, np.ndarray], item_tower_folder: str) -> dict[str, Any]:
    """Ray Data UDF (CPU tasks, a stage of its own): statements -> ragged token ids (+ hashed item metadata).

    Runs beside the item-tower actors, so the next batches are tokenized while the device encodes the
    current one; the ids are unpadded (`Featurizer.statement_tokens`, the padded path's tokens minus padding).
    """
    from uue.data.featurize import hash_metadata

    featurizer = _featurizer(item_tower_folder)
    statements = _batch_statements(batch)
    tokens = featurizer.statement_tokens(statements)
    out: dict[str, Any] = {"statement_id": batch["statement_id"], "text": batch["text"], "source": batch["source"],
                           "token_ids": [np.asarray(t, dtype=np.int64) for t in tokens]}
    if featurizer.config.heads.use_item_metadata:
        dim = featurizer.config.heads.item_metadata_dim
        out["item_metadata"] = np.stack([hash_metadata(s.metadata, dim) for s in statements]).astype(np.float32)
    return out


class ItemTowerEncoder:
    """Ray Data callable class: one item tower per actor, loaded once, encoding a batch per call.

    Padded (today's default): the actor tokenizes and pads each batch, then runs the Hugging Face forward.
    Packed: the batch arrives as ragged token ids from `tokenize_statements` and is encoded padding-free
    (`ItemTower.forward_ragged`), optionally with regionally compiled layers.
    """

    def __init__(self, item_tower_folder: str, device: str = "cpu", dtype: str = "auto", num_threads: int = 1,
                 attention: IndexAttention = "model", compile_layers: bool | None = None,
                 pack_tokens: int | None = None):
        import torch

        from uue.data.featurize import Featurizer
        from uue.model.encode import StatementBatchEncoder
        from uue.model.towers import packing_options
        from uue.model.uue_model import load_tower

        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.torch = torch
        self.device = torch.device(device)
        self.tower, tokenizer = load_tower(item_tower_folder, map_location=self.device)
        self.tower.to(getattr(torch, resolve_dtype(dtype, device)))
        config = index_model_config(read_tower_config(item_tower_folder), attention, compile_layers, pack_tokens)
        self.attention = config.packing.attention
        encoder = self.tower.encoder
        if self.attention == "packed":
            towers = config.towers
            encoder.use_packing(packing_options(
                config, checkpointing=False, max_length=towers.max_statement_length + towers.max_context_length))
        else:
            encoder.use_padded()
        featurizer = Featurizer(config, tokenizer, tokenizer)
        self.encoder = StatementBatchEncoder(self.tower, self.device, 2**31 - 1, featurizer)  # a Ray batch per call

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        torch = self.torch
        if self.attention == "packed":
            metadata = None
            if "item_metadata" in batch:
                metadata = torch.as_tensor(np.stack(list(batch["item_metadata"])))
            vectors = self.encoder.encode_ragged([np.asarray(t, dtype=np.int64) for t in batch["token_ids"]],
                                                 metadata)
        else:
            vectors = self.encoder.encode_batches([self.encoder.featurize(_batch_statements(batch))])
        # Re-normalise in float32: a bf16 unit vector is only unit to ~1e-2. A fitted pretrained path's statement
        # vectors are not unit by design (a share of the trained part, the fallback's e(x)): kept as they are, so the
        # index scores what the model scores.
        vectors = vectors.float() if self.tower.pretrained_path is not None else torch.nn.functional.normalize(
            vectors.float(), dim=-1)
        vectors = vectors.numpy()
        return {"statement_id": batch["statement_id"], "text": batch["text"], "source": batch["source"],
                "vector": vectors.astype(np.float32)}


# ---------------------------------------------------------------------------------------------- writing
def _vectors_table(ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    offsets = pa.array(np.arange(0, (len(ids) + 1) * dim, dim, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), type=pa.float32()))
    return pa.table({"statement_id": pa.array(list(ids), pa.string()), "text": pa.array(list(texts), pa.string()),
                     "vector": column})


class _ShardWriter:
    """Buffers encoded rows into numbered Parquet shards and feeds the ANN index from a background thread.

    Row i (in arrival order, which is shard order) gets ANN key i. usearch releases the GIL while it
    inserts, so building the graph overlaps with receiving the next batches. The first `SERIAL_ROWS` rows are
    inserted on one thread: concurrent inserts into a near-empty graph leave it poorly connected (on a
    306-statement catalogue, recall@10 fell to 0.95 for some arrival orders, against >= 0.99 serially).
    """

    ANN_CHUNK = 8192  # rows handed to the ANN thread at once
    SERIAL_ROWS = 8192  # rows inserted one at a time before usearch may insert on all cores

    def __init__(self, folder: Path, dimension: int, rows_per_shard: int, connectivity: int, expansion_search: int):
        from concurrent.futures import ThreadPoolExecutor

        self.folder = folder
        self.dimension = dimension
        self.rows_per_shard = rows_per_shard
        self.ann = new_ann(dimension, connectivity, expansion_search)
        self.shards: list[dict[str, Any]] = []
        self.count = 0  # rows received
        self.ann_seconds = 0.0
        self._ann_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ann-add")
        self._ann_jobs: list[Any] = []
        self._ann_pending: list[np.ndarray] = []
        self._ann_start = 0  # key of the first pending row
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._vectors: list[np.ndarray] = []

    def add(self, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"item tower returned vectors of shape {vectors.shape}, expected (n, {self.dimension})")
        self._ids.extend(ids)
        self._texts.extend(texts)
        self._vectors.append(vectors)
        self._ann_pending.append(vectors)
        self.count += len(ids)
        if self.count - self._ann_start >= self.ANN_CHUNK:
            self._submit_ann()
        if len(self._ids) >= self.rows_per_shard:
            self._write_shard()

    def _submit_ann(self) -> None:
        if not self._ann_pending:
            return
        vectors = np.ascontiguousarray(np.concatenate(self._ann_pending), dtype=np.float32)
        keys = np.arange(self._ann_start, self._ann_start + len(vectors), dtype=np.uint64)
        self._ann_jobs.append(self._ann_thread.submit(self._ann_add, keys, vectors))
        self._ann_start += len(vectors)
        self._ann_pending = []

    def _ann_add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        start = time.perf_counter()
        serial = min(len(vectors), max(0, self.SERIAL_ROWS - len(self.ann)))
        if serial:
            self.ann.add(keys[:serial], vectors[:serial], threads=1)
        if serial < len(vectors):
            self.ann.add(keys[serial:], vectors[serial:])  # threads=0: every core
        self.ann_seconds += time.perf_counter() - start

    def _write_shard(self) -> None:
        if not self._ids:
            return
        vectors = np.concatenate(self._vectors).astype(np.float32, copy=False)
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(_vectors_table(self._ids, self._texts, vectors), self.folder / name)
        self.shards.append({"file": name, "rows": len(vectors)})
        self._ids, self._texts, self._vectors = [], [], []

    def close(self) -> None:
        """Write the last shard and wait for every ANN insert (re-raising an insert's error)."""
        self._write_shard()
        self._submit_ann()
        try:
            for job in self._ann_jobs:
                job.result()
        finally:
            self._ann_thread.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self._ann_thread.shutdown(wait=True, cancel_futures=True)


def _check_output(out: Path) -> None:
    """Refuse to replace anything but an index (complete or partial): never delete a user's data folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _INDEX_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"output {out} holds {foreign[:5]}, which are not part of a statement index: refusing to replace it"
        )


def _remove_stale_staging(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        logger.warning("removing %s left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _publish(staging: Path, out: Path, version: str) -> None:
    """Move the finished staging folder to `out` (two renames; the old index is deleted afterwards)."""
    retired = out.parent / f".{out.name}.retired-{version}"
    if out.exists():
        os.rename(out, retired)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def _check_cluster_fits(resources: dict[str, float], min_actors: int, cpus_per_actor: float,
                        gpus_per_actor: float) -> None:
    """The pool's minimum must leave a CPU for the read tasks, or the pipeline waits forever."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    hint = "lower index.min_actors, or (on an autoscaling cluster) start enough nodes first"
    if min_actors * cpus_per_actor + 1 > cpus:
        raise ValueError(f"{min_actors} actors x {cpus_per_actor} CPU plus 1 CPU for reading need "
                         f"{min_actors * cpus_per_actor + 1:g} CPUs; the Ray cluster has {cpus:g}: {hint}")
    if gpus_per_actor > 0 and min_actors * gpus_per_actor > gpus:
        raise ValueError(f"{min_actors} actors x {gpus_per_actor} GPU need {min_actors * gpus_per_actor:g} GPUs; "
                         f"the Ray cluster has {gpus:g}: {hint}")


def new_version(fingerprint: str) -> str:
    """Unique per build, sortable by time: 20260101T120000123456Z-<fingerprint[:12]>-<random>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{fingerprint[:12]}-{uuid.uuid4().hex[:6]}"


def build_index(
    checkpoint: str | Path,
    input_uri: str | Path,
    output_uri: str | Path,
    *,
    min_actors: int,
    max_actors: int,
    batch_size: int,
    gpus_per_actor: float = 0,
    id_column: str = "statement_id",
    text_column: str = "text",
    cpus_per_actor: float = 1,
    dtype: str = "auto",
    rows_per_shard: int = 50_000,
    connectivity: int = 16,
    expansion_search: int = 64,
    progress: bool = True,
    attention: IndexAttention = "model",
    compile_layers: bool | None = None,
    pack_tokens: int | None = None,
) -> dict[str, Any]:
    """Encode every statement of `input_uri` with the checkpoint's item tower and write an index to `output_uri`.

    Ray Data reads and validates the input files in tasks, then runs `ItemTowerEncoder` in `map_batches`
    with an actor pool autoscaled between `min_actors` and `max_actors` (each actor reserving
    `gpus_per_actor` GPUs when > 0). The driver streams the encoded batches into Parquet shards and the
    usearch index in a staging folder, which replaces `output_uri` when complete. Returns the manifest.

    `attention` "packed" (or "model" with a tower saved with model.attention: packed) adds a CPU stage
    `tokenize_statements` before the actors, so tokenizing overlaps with encoding, and the actors encode
    padding-free packs of `pack_tokens` (default: model.pack_tokens) tokens, with `compile_layers`
    (default: model.compile_layers) regionally compiled; "padded" tokenizes and pads in the actors.
    """
    import ray
    from tqdm.auto import tqdm

    if min_actors < 1 or max_actors < min_actors:
        raise ValueError(f"need 1 <= min_actors <= max_actors, got {min_actors}, {max_actors}")
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError("batch_size and rows_per_shard must be >= 1")
    out_str = str(output_uri)
    if "://" in out_str and not out_str.startswith("file://"):
        raise ValueError(
            f"output {out_str}: the index is written to a local or shared (NFS) path; copy the folder to object "
            "storage afterwards if needed (usearch memory-maps a local file)"
        )
    out = Path(out_str.removeprefix("file://")).resolve()
    _check_output(out)
    model_folder, tower_folder = resolve_item_tower(checkpoint)
    fingerprint = checkpoint_fingerprint(model_folder)
    files, contract, filesystem = input_files(str(input_uri), id_column, text_column)
    saved = read_tower_config(tower_folder)
    dimension = read_output_dim(tower_folder)
    encoding = index_model_config(saved, attention, compile_layers, pack_tokens)
    version = new_version(fingerprint)
    device = "cuda" if gpus_per_actor > 0 else "cpu"

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a local cluster
    _check_cluster_fits(ray.cluster_resources(), min_actors, cpus_per_actor, gpus_per_actor)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.staging-{version}"
    (staging / VECTORS_DIR).mkdir(parents=True)
    started = time.perf_counter()
    writer: _ShardWriter | None = None
    try:
        ds = ray.data.from_items([{"path": f} for f in files]).map_batches(
            read_statement_files, batch_size=1, fn_kwargs=dict(
                contract=contract, id_column=id_column, text_column=text_column, rows_per_block=batch_size,
                filesystem=filesystem),
        )
        # One block per batch, so the actor pool has queued work to scale up on even for a single input file.
        ds = ds.repartition(target_num_rows_per_block=batch_size)
        if encoding.packing.attention == "packed":  # tokenized in CPU tasks while the actors encode earlier batches
            ds = ds.map_batches(tokenize_statements, batch_size=batch_size, batch_format="numpy",
                                fn_kwargs=dict(item_tower_folder=str(tower_folder)), udf_modifying_row_count=False)
        ds = ds.map_batches(
            ItemTowerEncoder,
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor if gpus_per_actor > 0 else None,
            fn_constructor_kwargs=dict(item_tower_folder=str(tower_folder), device=device, dtype=dtype,
                                       num_threads=int(max(1, cpus_per_actor)), attention=attention,
                                       compile_layers=compile_layers, pack_tokens=pack_tokens),
            udf_modifying_row_count=False,
        )
        writer = _ShardWriter(staging / VECTORS_DIR, dimension, rows_per_shard, connectivity, expansion_search)
        seen: dict[str, str] = {}
        first_batch_seconds = None
        first_batch_rows = 0
        with tqdm(desc="indexing statements", unit="stmt", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ids = [str(s) for s in batch["statement_id"]]
                for sid, source in zip(ids, batch["source"], strict=True):
                    if sid in seen:
                        raise DataValidationError(
                            str(source), None, id_column, f"duplicate statement id {sid!r} (first at {seen[sid]})"
                        )
                    seen[sid] = str(source)
                writer.add(ids, [str(t) for t in batch["text"]], np.asarray(batch["vector"], dtype=np.float32))
                bar.update(len(ids))
                if first_batch_seconds is None:  # start-up: scheduling, actor start, loading the tower
                    first_batch_seconds = time.perf_counter() - started
                    first_batch_rows = len(ids)
        stream_seconds = time.perf_counter() - started
        writer.close()
        ann_wait_seconds = time.perf_counter() - started - stream_seconds
        if writer.count == 0:
            raise ValueError(f"input {input_uri}: no statements to index")
        writer.ann.save(str(staging / ANN_FILE))
        total_seconds = time.perf_counter() - started
        # After start-up: rows after the first encoded batch over the stream's time after it.
        steady_seconds = stream_seconds - (first_batch_seconds or 0.0)
        steady_rate = (writer.count - first_batch_rows) / steady_seconds if steady_seconds > 0 else 0.0
        manifest = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "version": version,
            "checkpoint_fingerprint": fingerprint,
            "checkpoint": str(Path(checkpoint).resolve()),
            "count": writer.count,
            "dimension": dimension,
            "metric": METRIC,
            "dtype": "f32",
            "created_at": datetime.now(timezone.utc).isoformat(),
            "source": str(input_uri),
            "input_files": len(files),
            "id_column": id_column,
            "text_column": text_column,
            "shards": writer.shards,
            "ann": {"library": "usearch", "file": ANN_FILE, "connectivity": connectivity,
                    "expansion_search": expansion_search},
            "build": {"min_actors": min_actors, "max_actors": max_actors, "batch_size": batch_size,
                      "gpus_per_actor": gpus_per_actor, "dtype": resolve_dtype(dtype, device),
                      "attention": encoding.packing.attention, "compile_layers": encoding.packing.compile_layers,
                      "pack_tokens": encoding.packing.pack_tokens if encoding.packing.attention == "packed" else None,
                      "first_batch_seconds": round(first_batch_seconds or 0.0, 3), "first_batch_rows": first_batch_rows,
                      "stream_seconds": round(stream_seconds, 3), "ann_add_seconds": round(writer.ann_seconds, 3),
                      "ann_wait_seconds": round(ann_wait_seconds, 3),
                      "total_seconds": round(total_seconds, 3),
                      "statements_per_second": round(writer.count / total_seconds, 1),
                      "steady_statements_per_second": round(steady_rate, 1)},
        }
        # The manifest is written last inside staging, then the whole folder appears at `out` in one rename.
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _check_output(out)
        _publish(staging, out, version)
    except BaseException as err:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        cause = getattr(err, "cause", None)  # a RayTaskError carries the error the task raised
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, (DataValidationError, ValueError)):
            raise cause from None  # the bad record's file/row/field, not a page of Ray traceback
        raise
    return manifest


