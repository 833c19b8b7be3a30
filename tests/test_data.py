"""The data contract: readers for JSONL / Parquet / shard folders and errors that name file, row and field."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uue.data import DataValidationError, load_dataset, write_dataset
from uue.data.featurize import Featurizer, collate, hash_metadata, select_chunks, trim_batch
from uue.data.readers import dataset_from_users
from uue.data.schema import UserChunk, UserData
from uue.data.tokenizers import build_byte_tokenizer


def _copy_sample(sample_data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(sample_data_dir, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def _rewrite_line(path, line_no, mutate):
    lines = path.read_text().splitlines()
    record = json.loads(lines[line_no - 1])
    mutate(record)
    lines[line_no - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def test_sample_dataset_loads(sample_data_dir):
    ds = load_dataset(sample_data_dir)
    assert len(ds.users) == 48 and len(ds.statements) == 16
    assert {lab.split for lab in ds.labels} == {"train", "validation", "test"}
    assert ds.positive_pairs("train")
    assert all(user.statements for user in ds.users.values())


def test_jsonl_and_parquet_round_trip_equal(sample_data_dir, tmp_path):
    ds = load_dataset(sample_data_dir)
    write_dataset(tmp_path / "pq", ds, fmt="parquet")
    back = load_dataset(tmp_path / "pq")
    assert back.users.keys() == ds.users.keys()
    for uid, user in ds.users.items():
        assert back.users[uid].chunks == user.chunks
        assert back.users[uid].metadata == user.metadata
    assert back.labels == ds.labels
    assert back.statements == ds.statements


def test_shard_folder_is_one_table(sample_data_dir, tmp_path):
    data = _copy_sample(sample_data_dir, tmp_path)
    lines = (data / "users.jsonl").read_text().splitlines()
    (data / "users.jsonl").unlink()
    (data / "users").mkdir()
    (data / "users" / "part-0.jsonl").write_text("\n".join(lines[:20]) + "\n")
    rows = [json.loads(line) for line in lines[20:]]
    pq.write_table(pa.Table.from_pylist(rows), data / "users" / "part-1.parquet")
    assert len(load_dataset(data).users) == 48


@pytest.mark.parametrize(
    ("table", "line", "mutate", "field", "reason"),
    [
        ("users", 3, lambda r: r["chunks"][0].update(timestamp="yesterday"), "chunks[0].timestamp", "ISO-8601"),
        ("users", 5, lambda r: r.update(chunks=[]), "chunks", "at least one chunk"),
        ("users", 2, lambda r: r["chunks"][1].update(text=""), "chunks[1].text", "empty"),
        ("users", 7, lambda r: r.pop("user_id"), "user_id", "missing"),
        ("users", 7, lambda r: r.update(extra=1), "extra", "unknown field"),
        ("statements", 4, lambda r: r.update(text=3), "text", "expected a string"),
        ("labels", 10, lambda r: r.update(label=2), "label", "0 or 1"),
        ("labels", 11, lambda r: r.update(split="dev"), "split", "expected one of"),
        ("labels", 12, lambda r: r.update(user_id="ghost"), "user_id", "unknown user_id"),
    ],
)
def test_malformed_record_names_file_row_and_field(sample_data_dir, tmp_path, table, line, mutate, field, reason):
    data = _copy_sample(sample_data_dir, tmp_path)
    _rewrite_line(data / f"{table}.jsonl", line, mutate)
    with pytest.raises(DataValidationError) as info:
        load_dataset(data)
    err = info.value
    assert err.file.endswith(f"{table}.jsonl") and err.row == line and err.field == field
    assert reason in str(err) and f"row {line}" in str(err)


def test_broken_json_line_is_reported(sample_data_dir, tmp_path):
    data = _copy_sample(sample_data_dir, tmp_path)
    lines = (data / "statements.jsonl").read_text().splitlines()
    lines[5] = lines[5][:-3]
    (data / "statements.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=r"statements.jsonl, row 6: field '<json>': malformed JSON"):
        load_dataset(data)


def test_missing_table_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'users' table"):
        load_dataset(tmp_path)


def test_seed_userdata_builds_a_dataset():
    users = [UserData("a", [UserChunk("I hike")], statements=["likes hiking"]),
             UserData("b", [UserChunk("I cook")], statements=["likes cooking", "likes hiking"])]
    ds = dataset_from_users(users)
    assert len(ds.statements) == 2 and len(ds.positive_pairs(None)) == 3


def test_most_recent_chunks_are_kept():
    chunks = [UserChunk(f"t{i}", timestamp=f"2025-01-{10 + i:02d}T00:00:00Z") for i in range(5)]
    chunks.reverse()
    kept = select_chunks(chunks, 2)
    assert [c.text for c in kept] == ["t4", "t3"]  # the two newest, in their original order


def test_metadata_hashing_is_stable_and_sensitive():
    a = hash_metadata({"age": 30, "country": "uk"}, 64)
    assert (a == hash_metadata({"country": "uk", "age": 30}, 64)).all()
    assert not (a == hash_metadata({"age": 30, "country": "de"}, 64)).all()
    assert not hash_metadata(None, 64).any()


def test_featurizer_shapes_and_trim(tiny_model_config):
    tok = build_byte_tokenizer()
    feat = Featurizer(tiny_model_config, tok, tok)
    cfg = tiny_model_config
    user = UserData("u", [UserChunk("hello there"), UserChunk("a much longer text " * 10)])
    f = feat.user_features(user)
    assert f["user_input_ids"].shape == (cfg.num_chunks_per_user, cfg.max_chunk_length)
    assert f["chunk_mask"].sum() == 2
    s = feat.statement_features(["likes hiking", "x"])
    assert s["item_input_ids"].shape == (2, cfg.max_statement_length + cfg.max_context_length)
    batch = trim_batch(collate([f]))
    assert batch["user_input_ids"].shape == (1, 2, cfg.max_chunk_length)  # long chunk fills the length
    with pytest.raises(ValueError, match="empty text"):
        feat.statement_features(["  "])
