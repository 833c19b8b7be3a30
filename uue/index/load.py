"""Reading a statement index (what serving loads, without the Ray build job in uue.index.build).

An index is a folder:
    vectors/part-NNNNN.parquet  statement_id (str), text (str), vector (list<float32>, unit length);
                                row i of the shards in name order has ANN key i
    index.usearch               usearch HNSW index, inner-product metric, f32
    manifest.json               version, checkpoint_fingerprint, count, dimension, metric, created_at, source, ...

`manifest.json` is what makes a folder an index: the build writes it last and renames the whole folder into
place, so a reader sees the old index or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FORMAT = "uue-statement-index"
INDEX_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ANN_FILE = "index.usearch"
VECTORS_DIR = "vectors"
METRIC = "ip"  # inner product of unit vectors = cosine; usearch reports distance = 1 - dot


class IncompleteIndexError(FileNotFoundError):
    """A folder is not a complete statement index (missing or inconsistent manifest, ANN file or shards)."""


class UnknownStatementError(KeyError):
    """A statement id that the index does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def new_ann(dimension: int, connectivity: int, expansion_search: int) -> Any:
    """An empty usearch HNSW index over unit vectors (inner product), as the build writes and a reader loads."""
    from usearch.index import Index

    return Index(ndim=dimension, metric=METRIC, dtype="f32", connectivity=connectivity,
                 expansion_search=expansion_search)


class StatementIndex:
    """A loaded index: ANN search over statement vectors, plus id -> (text, vector) lookup."""

    def __init__(self, folder: Path, manifest: dict[str, Any], ids: list[str], texts: list[str],
                 vectors: np.ndarray, ann: Any):
        self.folder = folder
        self.manifest = manifest
        self.ids = ids
        self.texts = texts
        self.vectors = vectors
        self._ann = ann
        self._position = {sid: i for i, sid in enumerate(ids)}

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def checkpoint_fingerprint(self) -> str:
        return str(self.manifest["checkpoint_fingerprint"])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, statement_id: object) -> bool:
        return statement_id in self._position

    @classmethod
    def load(cls, folder: str | Path) -> StatementIndex:
        """Load a complete index; raises `IncompleteIndexError` naming what is missing or inconsistent."""
        folder = Path(str(folder).removeprefix("file://"))

        def incomplete(reason: str) -> IncompleteIndexError:
            return IncompleteIndexError(f"{folder} is not a complete statement index: {reason}")

        manifest_path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise incomplete("no such folder")
        if not manifest_path.is_file():
            raise incomplete(f"no {MANIFEST_FILE} (a build that did not finish, or not an index)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise incomplete(f"{MANIFEST_FILE} is not valid JSON ({err.msg})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
            raise incomplete(f"{MANIFEST_FILE} is not a {INDEX_FORMAT} manifest")
        if int(manifest.get("format_version", 0)) > INDEX_FORMAT_VERSION:
            raise incomplete(f"format_version {manifest['format_version']} is newer than {INDEX_FORMAT_VERSION}")
        shards = manifest.get("shards") or []
        tables = []
        for shard in shards:
            path = folder / VECTORS_DIR / shard["file"]
            if not path.is_file():
                raise incomplete(f"missing vector shard {VECTORS_DIR}/{shard['file']}")
            table = pq.read_table(path, columns=["statement_id", "text", "vector"])
            if table.num_rows != shard["rows"]:
                raise incomplete(
                    f"{VECTORS_DIR}/{shard['file']} has {table.num_rows} rows, manifest says {shard['rows']}"
                )
            tables.append(table)
        count, dimension = int(manifest["count"]), int(manifest["dimension"])
        if sum(t.num_rows for t in tables) != count:
            raise incomplete(f"shards hold {sum(t.num_rows for t in tables)} rows, manifest count is {count}")
        table = pa.concat_tables(tables) if tables else None
        if table is None or count == 0:
            raise incomplete("the index holds no statements")
        vectors = np.asarray(table.column("vector").combine_chunks().flatten().to_numpy(), dtype=np.float32)
        if vectors.size != count * dimension:
            raise incomplete(f"vectors do not have dimension {dimension}")
        ann_path = folder / str(manifest.get("ann", {}).get("file", ANN_FILE))
        if not ann_path.is_file():
            raise incomplete(f"no {ann_path.name}")
        ann_settings = manifest.get("ann", {})
        ann = new_ann(
            dimension, int(ann_settings.get("connectivity", 16)), int(ann_settings.get("expansion_search", 64))
        )
        ann.load(str(ann_path))
        if len(ann) != count or ann.ndim != dimension:
            raise incomplete(f"{ann_path.name} holds {len(ann)} vectors of dimension {ann.ndim}, expected "
                             f"{count} x {dimension}")
        ids = table.column("statement_id").to_pylist()
        return cls(folder, manifest, ids, table.column("text").to_pylist(), vectors.reshape(count, dimension), ann)

    def _queries(self, query_vectors: np.ndarray, k: int) -> np.ndarray:
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(f"query vectors must have shape (n, {self.dimension}), got {np.shape(query_vectors)}")
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN or infinity")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return queries

    def search(self, query_vectors: np.ndarray, k: int, exact: bool = False) -> list[list[tuple[str, str, float]]]:
        """Top-k statements per query vector: [(statement_id, text, score = dot product)], best first.

        `exact=True` scores every statement (brute force) instead of walking the HNSW graph.
        """
        queries = self._queries(query_vectors, k)
        k = min(int(k), len(self))
        if exact:
            scores = queries @ self.vectors.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return [[(self.ids[j], self.texts[j], float(scores[i, j])) for j in row] for i, row in enumerate(top)]
        matches = self._ann.search(queries, k)
        keys = np.asarray(matches.keys).reshape(len(queries), -1)
        distances = np.asarray(matches.distances).reshape(len(queries), -1)
        # usearch answers one query with `Matches` (only the hits) and several with `BatchMatches` (+ counts)
        counts = np.asarray(getattr(matches, "counts", [keys.shape[1]])).reshape(-1)
        return [
            [(self.ids[int(key)], self.texts[int(key)], float(1.0 - dist))
             for key, dist in zip(keys[i, : counts[i]], distances[i, : counts[i]], strict=True)]
            for i in range(len(queries))
        ]

    def statement(self, statement_id: str) -> tuple[str, np.ndarray]:
        """(text, unit vector) of one statement; `UnknownStatementError` for an id not in the index."""
        position = self._position.get(statement_id)
        if position is None:
            raise UnknownStatementError(f"unknown statement id {statement_id!r} (index version {self.version})")
        return self.texts[position], self.vectors[position]
