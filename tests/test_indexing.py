"""Batch indexing on a real local Ray cluster: Ray Data + actor pool -> Parquet vectors + usearch index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from uue.data.readers import load_dataset
from uue.data.schema import DataValidationError
from uue.index.build import build_index
from uue.index.load import (
    ANN_FILE,
    MANIFEST_FILE,
    VECTORS_DIR,
    IncompleteIndexError,
    StatementIndex,
    UnknownStatementError,
)
from uue.model import UUEModel
from uue.model.folder import checkpoint_fingerprint
from uue.model.inference import UUEInference

POOL = dict(min_actors=1, max_actors=2, progress=False)  # autoscaled between 1 and 2 actors
ONE_ACTOR = dict(min_actors=1, max_actors=1, progress=False)
SUBJECTS = ["hiking", "jazz", "cooking", "chess", "football", "poetry", "gardening", "sailing", "horror films",
            "video games", "astronomy", "baking", "cycling", "opera", "photography", "knitting", "surfing"]
FRAMES = ["loves {}", "would never try {}", "spends weekends on {}", "reads about {} every day",
          "would buy a book on {}", "talks about {} with friends", "is new to {}", "teaches {} to kids",
          "gave up {} last year", "wants to get better at {}", "follows {} news", "finds {} boring",
          "would pay for {} lessons", "grew up around {}", "dreams about {}", "owns gear for {}",
          "writes a blog on {}", "would travel for {}"]


def raw_vectors(folder: Path) -> tuple[list[str], np.ndarray]:
    """Read the vector shards with pyarrow alone (independent of StatementIndex)."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted((folder / VECTORS_DIR).glob("*.parquet"))])
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    return table.column("statement_id").to_pylist(), vectors


def probe_queries(vectors: np.ndarray) -> np.ndarray:
    """40 queries near indexed statements and 40 random unit directions (the hard case for a graph walk)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(40, vectors.shape[1])).astype(np.float32)
    return np.concatenate([vectors[rng.choice(len(vectors), 40, replace=False)] + 0.05 * noise,
                           noise / np.linalg.norm(noise, axis=1, keepdims=True)])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model_config) -> Path:
    folder = tmp_path_factory.mktemp("model") / "model"
    UUEModel.from_config(tiny_model_config, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_config():
    # module-scoped version of the conftest fixture (the model is built once per module); statements up to 48
    # byte tokens, so that no two test statements are cut to the same prefix (identical vectors tie in top-k);
    # item metadata on, so the sample statements' context and metadata travel through the pipeline
    from uue.config import ModelConfig

    return ModelConfig(
        user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4, max_chunk_length=32,
        max_statement_length=48, max_context_length=8, num_chunks_per_user=8, batch_size=8, dropout=0.0,
        num_negative_samples=0, negative_sampling="none", use_item_metadata=True, item_metadata_dim=8,
    )


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory) -> Path:
    """A non-contract table: integer ids in `item_id`, text in `title`, an extra column, two Parquet shards."""
    folder = tmp_path_factory.mktemp("items")
    texts = [frame.format(subject) for subject in SUBJECTS for frame in FRAMES]  # 306 distinct statements
    ids = list(range(1000, 1000 + len(texts)))
    half = len(texts) // 2
    for part, (lo, hi) in enumerate(((0, half), (half, len(texts)))):
        pq.write_table(pa.table({"item_id": ids[lo:hi], "title": texts[lo:hi], "popularity": list(range(lo, hi))}),
                       folder / f"part-{part}.parquet")
    return folder


@pytest.fixture(scope="module")
def contract_index(ray_session, tiny_model_dir, sample_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("contract") / "index"
    manifest = build_index(tiny_model_dir, sample_data_dir, out, batch_size=4, rows_per_shard=5, **POOL)
    return out, manifest


@pytest.fixture(scope="module")
def table_index(ray_session, tiny_model_dir, table_dir, tmp_path_factory) -> Path:
    """Built through the job's command line, in-process (the session's Ray cluster is reused)."""
    from ray_jobs.index_items import main

    out = tmp_path_factory.mktemp("table") / "index"
    code = main(["--checkpoint", str(tiny_model_dir), "--input", str(table_dir), "--output", str(out),
                 "--id-column", "item_id", "--text-column", "title", "--min-actors", "1", "--max-actors", "2",
                 "--batch-size", "32", "index.rows_per_shard=100"])
    assert code == 0
    return out


def test_every_contract_statement_indexed_once_with_item_tower_vectors(contract_index, tiny_model_dir,
                                                                     sample_data_dir):
    out, manifest = contract_index
    statements = list(load_dataset(sample_data_dir).statements.values())
    ids, vectors = raw_vectors(out)
    assert sorted(ids) == sorted(s.statement_id for s in statements)
    assert len(set(ids)) == len(ids) == manifest["count"] == len(statements)
    assert len(manifest["shards"]) > 1  # rows_per_shard=5 forces several shards
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    expected = UUEInference(tiny_model_dir, device="cpu").encode_statements(statements)
    by_id = dict(zip(ids, vectors, strict=True))
    got = np.stack([by_id[s.statement_id] for s in statements])
    np.testing.assert_allclose(got, expected, atol=1e-5)

    assert manifest["dimension"] == 16 and manifest["metric"] == "ip"
    assert manifest["checkpoint_fingerprint"] == checkpoint_fingerprint(tiny_model_dir)
    assert manifest["source"] == str(sample_data_dir)
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == manifest and (out / ANN_FILE).is_file()
    assert leftovers(out) == []


def test_loaded_index_contract(contract_index, sample_data_dir):
    out, manifest = contract_index
    index = StatementIndex.load(out)
    assert index.version == manifest["version"] and index.dimension == 16 and len(index) == manifest["count"]
    ids, vectors = raw_vectors(out)
    text, vector = index.statement(ids[3])
    np.testing.assert_array_equal(vector, vectors[3])
    assert text == load_dataset(sample_data_dir).statements[ids[3]].text
    # a statement's own vector finds itself first, with score = dot product = 1
    (best, *_), = index.search(vectors[3], k=4)
    assert best[0] == ids[3] and best[1] == text and best[2] == pytest.approx(1.0, abs=1e-5)
    # k larger than the index returns every statement once
    everything = index.search(vectors[:2], k=100)
    assert [sorted(r[0] for r in row) for row in everything] == [sorted(ids)] * 2
    with pytest.raises(UnknownStatementError, match="unknown statement id 'nope'"):
        index.statement("nope")
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        index.search(np.ones((2, 8), np.float32), k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(vectors[:1], k=0)


def test_table_with_custom_columns_via_job(table_index, table_dir, tiny_model_dir):
    source = pa.concat_tables([pq.read_table(p) for p in sorted(table_dir.glob("*.parquet"))])
    ids, vectors = raw_vectors(table_index)
    assert sorted(ids) == sorted(str(i) for i in source.column("item_id").to_pylist())
    assert len(set(ids)) == len(ids)
    manifest = StatementIndex.load(table_index).manifest
    assert manifest["id_column"] == "item_id" and manifest["count"] == source.num_rows
    # the job's vectors equal direct encoding for a sample of rows
    text_of = dict(zip((str(i) for i in source.column("item_id").to_pylist()), source.column("title").to_pylist(),
                       strict=True))
    sample = ids[::37]
    expected = UUEInference(tiny_model_dir, device="cpu").encode_statements([text_of[i] for i in sample])
    np.testing.assert_allclose(vectors[::37], expected, atol=1e-5)


def test_ann_search_agrees_with_brute_force(table_index):
    index = StatementIndex.load(table_index)
    ids, vectors = raw_vectors(table_index)
    queries = probe_queries(vectors)
    k = 10
    scores = queries @ vectors.T
    assert len(np.unique(vectors.round(6), axis=0)) == len(vectors)  # no exact ties between statements
    truth = [set(np.array(ids)[np.argsort(-row)[:k]]) for row in scores]
    ann = index.search(queries, k)
    recall = np.mean([len(truth[i] & {sid for sid, _, _ in ann[i]}) / k for i in range(len(queries))])
    assert recall >= 0.98, recall
    position = {sid: i for i, sid in enumerate(ids)}
    for i, row in enumerate(ann):
        returned = [score for _, _, score in row]
        assert returned == sorted(returned, reverse=True)  # best first
        np.testing.assert_allclose(returned, [scores[i, position[sid]] for sid, _, _ in row], atol=1e-5)
    exact = index.search(queries, k, exact=True)
    assert [{sid for sid, _, _ in row} for row in exact] == truth


def test_ann_graph_keeps_recall_for_every_arrival_order(tiny_model_dir, tmp_path):
    """The actor pool delivers rows in any order; the graph built from them must not depend on luck."""
    from uue.index.build import _ShardWriter

    texts = [frame.format(subject) for subject in SUBJECTS for frame in FRAMES]
    vectors = UUEInference(tiny_model_dir, device="cpu").encode_statements(texts).astype(np.float32)
    queries = probe_queries(vectors)
    k = 10
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    recalls = []
    for order in range(30):
        arrival = np.random.default_rng(order).permutation(len(vectors))
        writer = _ShardWriter(tmp_path, vectors.shape[1], rows_per_shard=10_000, connectivity=16, expansion_search=64)
        for batch in np.array_split(arrival, 10):  # batches as the actors hand them over
            writer.add([str(i) for i in batch], [texts[i] for i in batch], vectors[batch])
        writer.close()
        found = arrival[np.asarray(writer.ann.search(queries, k).keys).astype(int)]
        recalls.append(np.mean([len(set(truth[i]) & set(found[i])) / k for i in range(len(queries))]))
        (tmp_path / "part-00000.parquet").unlink()
    assert min(recalls) >= 0.99, recalls  # serial inserts: 0.9925 at worst over these orders (was 0.9875)


def test_rerun_after_interruption_gives_complete_index_without_duplicates(
    contract_index, tiny_model_dir, sample_data_dir, tmp_path
):
    out = tmp_path / "index"
    shutil.copytree(contract_index[0], out)
    first = contract_index[1]
    # What a killed build can leave: a half-written staging folder beside the output, and an output folder
    # holding some vector shards but no manifest and no ANN file.
    stale = tmp_path / ".index.staging-killed"
    (stale / VECTORS_DIR).mkdir(parents=True)
    shutil.copy(out / VECTORS_DIR / "part-00000.parquet", stale / VECTORS_DIR / "part-00000.parquet")
    (out / MANIFEST_FILE).unlink()
    (out / ANN_FILE).unlink()
    (out / VECTORS_DIR / "part-00001.parquet").unlink()
    with pytest.raises(IncompleteIndexError, match="no manifest.json"):
        StatementIndex.load(out)

    second = build_index(tiny_model_dir, sample_data_dir, out, batch_size=8, rows_per_shard=8, **ONE_ACTOR)
    index = StatementIndex.load(out)
    ids, _ = raw_vectors(out)
    assert len(ids) == len(set(ids)) == second["count"] == first["count"] == len(index)
    assert sorted(ids) == sorted(load_dataset(sample_data_dir).statements)
    assert second["version"] != first["version"]
    assert second["checkpoint_fingerprint"] == first["checkpoint_fingerprint"]
    assert leftovers(out) == []


def test_failed_build_keeps_previous_index(contract_index, tiny_model_dir, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(contract_index[0], out)
    good = contract_index[1]
    bad_input = tmp_path / "bad"
    bad_input.mkdir()
    lines = [json.dumps({"statement_id": f"s{i}", "text": f"statement number {i}"}) for i in range(10)]
    lines.insert(6, json.dumps({"statement_id": "s_empty", "text": "   "}))
    (bad_input / "statements.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=r"statements.jsonl, row 7: field 'text': empty string"):
        build_index(tiny_model_dir, bad_input, out, batch_size=4, **ONE_ACTOR)
    assert StatementIndex.load(out).version == good["version"]
    assert leftovers(out) == []


def test_duplicate_ids_and_bad_arguments_are_reported(ray_session, tiny_model_dir, sample_data_dir, tmp_path,
                                                       capsys):
    from ray_jobs.index_items import main

    table = tmp_path / "items.jsonl"
    table.write_text("\n".join(json.dumps({"sku": s, "name": n}) for s, n in
                               [("a", "likes tea"), ("b", "likes coffee"), ("a", "likes water")]) + "\n")
    with pytest.raises(DataValidationError, match=r"duplicate statement id 'a' \(first at .*items.jsonl, row 1\)"):
        build_index(tiny_model_dir, table, tmp_path / "out", batch_size=2, id_column="sku", text_column="name",
                    **ONE_ACTOR)
    assert not (tmp_path / "out").exists()
    # the job turns bad input into exit status 2 and one readable line
    assert main(["--checkpoint", str(tiny_model_dir), "--input", str(table), "--output", str(tmp_path / "o"),
                 "--id-column", "id", "--max-actors", "1"]) == 2
    assert "field 'id': missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="id_column/text_column"):
        build_index(tiny_model_dir, sample_data_dir, tmp_path / "o", batch_size=2, id_column="sku", **ONE_ACTOR)
    # never replace a folder that is not an index
    foreign = tmp_path / "my_data"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        build_index(tiny_model_dir, table, foreign, batch_size=2, id_column="sku", text_column="name", **ONE_ACTOR)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_incomplete_folders_are_rejected(contract_index, tmp_path):
    out, _ = contract_index
    with pytest.raises(IncompleteIndexError, match="no such folder"):
        StatementIndex.load(tmp_path / "missing")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / ANN_FILE).unlink()
    with pytest.raises(IncompleteIndexError, match="no index.usearch"):
        StatementIndex.load(copy)
    shutil.copytree(out, copy, dirs_exist_ok=True)
    next((copy / VECTORS_DIR).glob("*.parquet")).unlink()
    with pytest.raises(IncompleteIndexError, match="missing vector shard"):
        StatementIndex.load(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IncompleteIndexError, match="not valid JSON"):
        StatementIndex.load(copy)


def test_fingerprint_follows_weights_and_checkpoint_layouts(tiny_model_dir, tiny_model_config, tmp_path):
    step = tmp_path / "checkpoints" / "step_4"
    shutil.copytree(tiny_model_dir, step / "model")
    assert checkpoint_fingerprint(step) == checkpoint_fingerprint(tiny_model_dir)
    other = UUEModel.from_config(tiny_model_config, seed=1).save_pretrained(tmp_path / "other")
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(tiny_model_dir)


# ---------------------------------------------------------------------------------------------- packed actors
@pytest.mark.slow
def test_packed_indexing_writes_the_padded_vectors_and_answers_the_same_top_k(
    contract_index, table_index, tiny_model_dir, sample_data_dir, table_dir, tmp_path
):
    """index.attention=packed (ragged ids tokenized in their own Ray Data stage, encoded padding-free) gives the
    padded actors' vectors: float32 on CPU, max abs diff <= 1e-5, cosine >= 0.9999, and the same top-k."""
    from ray_jobs.index_items import main

    # Contract statements (context + metadata): packs of 64 tokens hold one or two statements, so a batch of
    # 4 spans several packs with boundaries between them.
    out = tmp_path / "contract-packed"
    manifest = build_index(tiny_model_dir, sample_data_dir, out, batch_size=4, rows_per_shard=5, attention="packed",
                           pack_tokens=64, **ONE_ACTOR)
    assert manifest["build"]["attention"] == "packed" and manifest["build"]["pack_tokens"] == 64
    # The table through the job's command line, default pack size (one pack per batch of 32).
    table_out = tmp_path / "table-packed"
    assert main(["--checkpoint", str(tiny_model_dir), "--input", str(table_dir), "--output", str(table_out),
                 "--id-column", "item_id", "--text-column", "title", "--min-actors", "1", "--max-actors", "1",
                 "--batch-size", "32", "index.attention=packed"]) == 0
    for padded_dir, packed_dir in ((contract_index[0], out), (table_index, table_out)):
        padded_ids, padded = raw_vectors(padded_dir)
        packed_ids, packed = raw_vectors(packed_dir)
        assert sorted(packed_ids) == sorted(padded_ids) and len(set(packed_ids)) == len(packed_ids)
        by_id = dict(zip(packed_ids, packed, strict=True))
        packed = np.stack([by_id[sid] for sid in padded_ids])
        assert np.abs(packed - padded).max() <= 1e-5
        assert (packed * padded).sum(1).min() >= 0.9999
    assert StatementIndex.load(table_out).manifest["build"]["attention"] == "packed"

    padded_index, packed_index = StatementIndex.load(table_index), StatementIndex.load(table_out)
    rng = np.random.default_rng(1)
    queries = padded_index.vectors[rng.choice(len(padded_index), 30, replace=False)]
    queries = queries + 0.05 * rng.normal(size=queries.shape).astype(np.float32)
    for exact in (True, False):
        expected = [[sid for sid, _, _ in row] for row in padded_index.search(queries, 10, exact=exact)]
        got = [[sid for sid, _, _ in row] for row in packed_index.search(queries, 10, exact=exact)]
        if exact:
            assert got == expected
        else:  # two HNSW graphs: the same neighbours, up to the graph's own (tested) recall
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, expected, strict=True)])
            assert overlap >= 0.98, overlap


def test_index_encoding_options_are_validated(tiny_model_dir):
    from uue.index.build import index_model_config
    from uue.model.folder import read_tower_config

    saved = read_tower_config(tiny_model_dir / "item_tower")
    assert index_model_config(saved).attention == "padded"  # "model": what the tower was saved with
    assert index_model_config(saved, "packed", compile_layers=True).compile_layers
    with pytest.raises(ValueError, match="pack_tokens=16 must hold the longest sequence"):
        index_model_config(saved, "packed", pack_tokens=16)
    with pytest.raises(ValueError, match="use model, padded or packed"):
        index_model_config(saved, "sparse")  # type: ignore[arg-type]


def test_a_model_with_a_pretrained_path_indexes_its_wider_statement_vectors(ray_session, tiny_model_config,
                                                                          sample_data_dir, tmp_path):
    """The path and the user fallback make statement vectors wider and not unit (the fallback's e(x) follows the
    unit part): the index keeps them as the model writes them, so it scores what the model scores."""
    from uue.model.backbone import TINY_HIDDEN
    from uue.model.pretrained_path import StatementPretrainedPath, UserPretrainedPath

    model = UUEModel.from_config(tiny_model_config, seed=0)
    bank = torch.randn(6, TINY_HIDDEN, generator=torch.Generator().manual_seed(0))
    model.item_tower.pretrained_path = StatementPretrainedPath(bank, torch.ones(16) / 4, threshold=0.05,
                                                               offset_threshold=0.05, sharpness=0.05, fallback=True)
    model.user_tower.pretrained_path = UserPretrainedPath(torch.zeros(TINY_HIDDEN), 1.0, fallback_threshold=0.4,
                                                          fallback_sharpness=0.01)
    model.save_pretrained(tmp_path / "model")
    manifest = build_index(tmp_path / "model", sample_data_dir, tmp_path / "index", batch_size=8, **ONE_ACTOR)
    assert manifest["dimension"] == 16 + 2 * TINY_HIDDEN + 1
    statements = list(load_dataset(sample_data_dir).statements.values())
    ids, vectors = raw_vectors(tmp_path / "index")
    expected = UUEInference(tmp_path / "model", device="cpu").encode_statements(statements)
    by_id = dict(zip(ids, vectors, strict=True))
    np.testing.assert_allclose(np.stack([by_id[s.statement_id] for s in statements]), expected, atol=1e-5)
    assert np.abs(expected[:, 16 : 16 + TINY_HIDDEN]).max() > 0.01  # the gate opened for some statements
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 2**0.5, atol=1e-5)  # unit part + unit e(x)
