"""Ray Data preprocessing: planted bad rows are rejected with their exact reasons, every good row is written
exactly once, and the written token arrays equal what the `Featurizer` computes directly."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from uue.data.chunking import chunk_token_budget, split_long_chunks, split_text
from uue.data.featurize import Featurizer, chunk_text
from uue.data.schema import UserChunk, parse_label, parse_statement, parse_user
from uue.data.tokenizers import load_tokenizer

WORDS = ("the quick brown fox jumps over lazy dogs while überraschend naïve 東京 tokenization-heavy "
         "antidisestablishmentarianism").split()


def _long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


# ---------------------------------------------------------------------------------- chunking (no Ray)
@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3", "minilm"])
def test_split_text_pieces_fit_the_budget_and_cover_the_text(name):
    tokenizer = load_tokenizer(name)
    text = _long_text(300)
    for max_length in (24, 64):
        chunks = split_long_chunks([UserChunk(text, "forum", "2025-01-01T00:00:00Z")], tokenizer, max_length)
        assert len(chunks) > 1
        for chunk in chunks:
            assert len(tokenizer(chunk_text(chunk))["input_ids"]) <= max_length
            assert (chunk.platform, chunk.timestamp) == ("forum", "2025-01-01T00:00:00Z")
        # Nothing lost or reordered: only whitespace at the cuts goes.
        assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_short_texts_are_not_split():
    tokenizer = load_tokenizer("tiny")
    budget = chunk_token_budget(tokenizer, 32, None)
    text = "x" * budget
    assert split_text(text, tokenizer, budget) == [text]
    assert split_text(text + "y", tokenizer, budget) == [text, "y"]


# ---------------------------------------------------------------------------------- the planted dataset
def _sample_records(sample_data_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (sample_data_dir / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def planted(tmp_path, sample_data_dir):
    """Users in two shards (JSONL + Parquet), statements as one Parquet file, labels as JSONL, with bad rows.

    Returns (input folder, expected rejects {(table, file name, row): (field, reason fragment)}, good records).
    """
    users = {u["user_id"]: u for u in _sample_records(sample_data_dir, "users")}
    statements = _sample_records(sample_data_dir, "statements")
    sample_labels = _sample_records(sample_data_dir, "labels")
    root = tmp_path / "raw"

    u_long = {"user_id": "u_long", "chunks": [
        {"text": "short and old", "platform": "chat", "timestamp": "2024-01-01T00:00:00Z"},
        {"text": _long_text(120), "platform": "forum", "timestamp": "2025-03-01T00:00:00Z"},
    ]}
    u_many = {"user_id": "u_many", "chunks": [
        {"text": f"post number {i}", "platform": None, "timestamp": f"2025-01-{i + 1:02d}T00:00:00Z"}
        for i in (5, 3, 11, 0, 7, 1, 9, 2, 10, 4, 6, 8)  # 12 chunks, out of order: keep the 8 most recent
    ]}
    bad_ts = {"user_id": "u_badts", "chunks": [{"text": "hello", "timestamp": "yesterday"}]}
    u002_first = {**users["u002"], "chunks": users["u002"]["chunks"][:1]}
    _write_jsonl(root / "users" / "part-0.jsonl", [
        json.dumps(users["u000"]),                                   # 1
        json.dumps(users["u001"]),                                   # 2
        '{"user_id": "u_broken", "chunks": [',                       # 3 malformed JSON
        json.dumps(bad_ts),                                          # 4 bad timestamp
        json.dumps(u_long),                                          # 5
        json.dumps(u_many),                                          # 6
        json.dumps(u002_first),                                      # 7 (part-1.parquet row 1 repeats its id)
        "",                                                          # 8 blank: not a record
        json.dumps({"user_id": "u_nochunks", "chunks": []}),        # 9 no chunks
        json.dumps({**users["u004"], "age": 31}),                    # 10 unknown field
    ])
    parquet_users = [users["u002"], users["u003"], {**users["u005"], "user_id": None}]
    for record in parquet_users:
        record["metadata"] = None
    pq.write_table(pa.Table.from_pylist(parquet_users), root / "users" / "part-1.parquet")

    bad_statements = [{"statement_id": "blank", "text": "   ", "context": None, "metadata": None},
                      {**statements[0], "text": "a second text for the same id"}]
    rows = [{"statement_id": s["statement_id"], "text": s["text"], "context": s.get("context"), "metadata": None}
            for s in statements] + bad_statements
    pq.write_table(pa.Table.from_pylist(rows), root / "statements.parquet")

    good_users = ["u000", "u001", "u_long", "u_many", "u002", "u003"]
    label_lines = [json.dumps(lab) for lab in sample_labels if lab["user_id"] in good_users]
    sid = statements[1]["statement_id"]
    label_lines += [
        json.dumps({"user_id": "u_long", "statement_id": sid, "label": 1, "split": "train"}),
        json.dumps({"user_id": "u_many", "statement_id": sid, "label": 0, "split": "test", "group": "g"}),
    ]
    n_good_labels = len(label_lines)
    label_lines += [
        json.dumps({"user_id": "u000", "statement_id": sid, "label": 2}),                  # bad label value
        json.dumps({"user_id": "u000", "statement_id": sid, "label": 1, "split": "dev"}),  # bad split
        json.dumps({"user_id": "u_badts", "statement_id": sid, "label": 1}),             # rejected user
        json.dumps({"user_id": "u000", "statement_id": "blank", "label": 1}),            # rejected statement
        json.dumps({"user_id": "nobody", "statement_id": sid, "label": 1}),              # unknown user
    ]
    _write_jsonl(root / "labels.jsonl", label_lines)

    n_statement_rows = len(statements)
    expected_rejects = {
        ("users", "part-0.jsonl", 3): ("<json>", "malformed JSON"),
        ("users", "part-0.jsonl", 4): ("chunks[0].timestamp", "not ISO-8601: 'yesterday'"),
        ("users", "part-0.jsonl", 9): ("chunks", "at least one chunk"),
        ("users", "part-0.jsonl", 10): ("age", "unknown field"),
        # Files are read in order (shards sorted by name): the first occurrence of an id wins.
        ("users", "part-1.parquet", 1): ("user_id", "duplicate user_id 'u002' (first in"),
        ("users", "part-1.parquet", 3): ("user_id", "missing"),
        ("statements", "statements.parquet", n_statement_rows + 1): ("text", "empty string"),
        ("statements", "statements.parquet", n_statement_rows + 2): ("statement_id", "duplicate statement_id"),
        ("labels", "labels.jsonl", n_good_labels + 1): ("label", "expected 0 or 1, got 2"),
        ("labels", "labels.jsonl", n_good_labels + 2): ("split", "expected one of"),
        ("labels", "labels.jsonl", n_good_labels + 3): ("user_id", "unknown user_id 'u_badts'"),
        ("labels", "labels.jsonl", n_good_labels + 4): ("statement_id", "unknown statement_id 'blank'"),
        ("labels", "labels.jsonl", n_good_labels + 5): ("user_id", "unknown user_id 'nobody'"),
    }
    # The good records, as the schema parses them (the first occurrence wins for a duplicated id).
    good = {
        "users": {uid: parse_user(r) for uid, r in
                  (("u000", users["u000"]), ("u001", users["u001"]), ("u_long", u_long), ("u_many", u_many),
                   ("u002", u002_first), ("u003", users["u003"]))},
        "statements": {s["statement_id"]: parse_statement(s) for s in statements},
        "labels": [parse_label(json.loads(line)) for line in label_lines[:n_good_labels]],
    }
    return root, expected_rejects, good


@pytest.fixture
def s3_bucket():
    """A real S3 endpoint on 127.0.0.1 (moto's server) with a bucket `uue`; yields (admin fs, URI of a key)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = dict(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    admin = pafs.S3FileSystem(access_key="testing", secret_key="testing", allow_bucket_creation=True, **endpoint)
    admin.create_dir("uue")
    query = "&".join(f"{k}={v}" for k, v in endpoint.items())
    try:
        yield admin, lambda key: f"s3://testing:testing@uue/{key}?{query}"
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- the Ray job
def test_preprocess_rejects_exactly_the_bad_rows_and_matches_the_featurizer(
    ray_session, planted, s3_bucket, tmp_path, tiny_model_config
):

    from uue.data.preprocess import MANIFEST, REJECTS, preprocess

    root, expected_rejects, good = planted
    config = tiny_model_config
    # Input and output in an object store, read and written by Ray tasks in other processes through the
    # pyarrow filesystem of the URI; then the output is copied back here to be checked.
    s3, s3_uri = s3_bucket
    pafs.copy_files(str(root), "uue/raw", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    report = preprocess(s3_uri("raw"), s3_uri("out"), config, max_actors=1, batch_size=4)
    output = tmp_path / "out"
    pafs.copy_files("uue/out", str(output), source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem())

    # -- counts: read = written + rejected, per table
    expected_written = {"users": len(good["users"]), "statements": len(good["statements"]),
                        "labels": len(good["labels"])}
    for table, counts in report.counts.items():
        n_rejected = sum(1 for key in expected_rejects if key[0] == table)
        assert (counts.written, counts.rejected) == (expected_written[table], n_rejected), table
        assert counts.read == counts.written + counts.rejected
    assert "13 rejected records" in report.summary()

    # -- rejects: exactly the planted rows, each with its field and reason
    rejects = [json.loads(line) for line in (output / REJECTS).read_text().splitlines()]
    assert len(rejects) == len(expected_rejects)
    found = {}
    for r in rejects:
        assert r["file"].startswith("s3://uue/raw/") and "testing" not in r["file"], r  # no credentials
        found[(r["table"], Path(r["file"]).name, r["row"])] = (r["field"], r["reason"])
    assert set(found) == set(expected_rejects)
    for key, (field_name, fragment) in expected_rejects.items():
        assert found[key][0] == field_name, key
        assert fragment in found[key][1], (key, found[key])

    # -- users: every good user exactly once, ragged tokens (no padding) equal to the Featurizer's
    user_rows = pq.read_table(output / "users").to_pylist()
    assert Counter(r["user_id"] for r in user_rows) == Counter(list(good["users"]))
    featurizer = Featurizer(config, load_tokenizer(config.user_model_name), load_tokenizer(config.item_model_name))
    for row in user_rows:
        user = good["users"][row["user_id"]]
        pieces = split_long_chunks(user.chunks, featurizer.user_tokenizer, config.max_chunk_length)
        padded = featurizer.user_features(pieces)
        assert row["chunk_tokens"] == [ids[mask.astype(bool)].tolist() for ids, mask in
                                       zip(padded["user_input_ids"], padded["user_attention_mask"], strict=True)
                                       if mask.any()], row["user_id"]
        assert row["num_chunks"] == len(user.chunks)
        if row["num_pieces"] == len(user.chunks):  # nothing to split: exactly the plain Featurizer output
            assert row["chunk_tokens"] == featurizer.user_tokens(user)
    by_id = {r["user_id"]: r for r in user_rows}
    assert by_id["u_many"]["num_pieces"] == 12  # short posts stay whole
    # The long post became several chunks instead of being truncated; the 8 most recent pieces are kept.
    assert by_id["u_long"]["num_pieces"] > 2 and by_id["u_long"]["num_kept"] == config.num_chunks_per_user
    assert by_id["u_long"]["chunk_tokens"] != featurizer.user_tokens(good["users"]["u_long"])
    # u_many: 12 chunks, the 8 most recent kept (days 5..12 in their file order).
    kept_texts = featurizer.user_tokenizer.batch_decode(by_id["u_many"]["chunk_tokens"], skip_special_tokens=True)
    assert sorted(int(t.split()[-1]) for t in kept_texts) == list(range(4, 12))

    # -- statements: each exactly once, indexed in id order, tokens equal to the Featurizer's
    statement_rows = sorted(pq.read_table(output / "statements").to_pylist(), key=lambda r: r["statement_index"])
    ids = [r["statement_id"] for r in statement_rows]
    assert ids == sorted(good["statements"]) and [r["statement_index"] for r in statement_rows] == list(range(len(ids)))
    assert [r["tokens"] for r in statement_rows] == featurizer.statement_tokens([good["statements"][s] for s in ids])
    # -- each user's training labels travel with it, as statement indices
    for row in user_rows:
        mine = [lab for lab in good["labels"] if lab.user_id == row["user_id"] and lab.split == "train"]
        assert sorted(zip(row["label_statements"], row["label_values"], strict=True)) == sorted(
            (ids.index(lab.statement_id), lab.label) for lab in mine)
        assert row["positives"] == sorted({ids.index(lab.statement_id) for lab in mine if lab.label == 1})

    # -- labels: the valid ones, each exactly once
    label_table = pq.read_table(output / "labels")
    written = Counter(
        (r["user_id"], r["statement_id"], r["label"], r["split"], r["group"]) for r in label_table.to_pylist()
    )
    assert written == Counter((lab.user_id, lab.statement_id, lab.label, lab.split, lab.group)
                              for lab in good["labels"])

    # -- manifest
    manifest = json.loads((output / MANIFEST).read_text())
    n_user_rejects = sum(1 for key in expected_rejects if key[0] == "users")
    assert manifest["tables"]["users"] == {"read": 6 + n_user_rejects, "written": 6, "rejected": n_user_rejects}
    assert manifest["rejects"]["count"] == 13
    assert manifest["format"] == "uue-preprocessed/2" and manifest["train_split"] == "train"
    assert manifest["fingerprint"]["max_chunk_length"] == config.max_chunk_length
    assert manifest["counts"]["users"] == 6 and manifest["counts"]["train_users"] == sum(
        1 for r in user_rows if r["positives"])
    for table in ("users", "statements", "labels"):
        assert manifest["files"][table] and all((output / f).is_file() for f in manifest["files"][table])

    # -- a second run refuses to mix its shards into the first run's output
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess(s3_uri("raw"), s3_uri("out"), config)


def test_preprocess_cli_reports_a_bad_config_without_starting_ray(tmp_path, capsys):
    from ray_jobs.preprocess import main

    code = main(["--input", "uue/data/sample_data", "--output", str(tmp_path / "o"), "--config", "configs/tiny.yaml",
                 "model.max_chunk_length=1"])
    assert code == 2
    assert "model.towers.max_chunk_length" in capsys.readouterr().err


def test_dataset_and_index_input_read_an_object_store_uri_with_its_query_options(s3_bucket, sample_data_dir):
    """Credentials and ?endpoint_override=... configure the filesystem that opens every listed file."""
    from uue.data.readers import load_dataset
    from uue.index.build import input_files, read_statement_files

    s3, s3_uri = s3_bucket
    pafs.copy_files(str(sample_data_dir), "uue/sample", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    local, remote = load_dataset(sample_data_dir), load_dataset(s3_uri("sample"))
    assert remote.users == local.users and remote.statements == local.statements and remote.labels == local.labels

    files, contract, filesystem = input_files(s3_uri("sample"))
    assert contract and files == ["s3://uue/sample/statements.jsonl"]  # no credentials in the names
    rows = list(read_statement_files({"path": np.array(files)}, contract, "statement_id", "text", 1000,
                                     filesystem=filesystem))
    assert [sid for block in rows for sid in block["statement_id"]] == list(local.statements)


@pytest.mark.slow
def test_training_streams_shards_from_an_object_store(ray_session, s3_bucket, sample_data_dir, tmp_path):
    """End to end through S3: Ray preprocessing writes the shards to the bucket, then `uue train`'s trainer and a
    Ray Train worker (ZeRO-0) both stream them from there: the same per-step losses."""
    from uue.config import load_config
    from uue.data.preprocess import preprocess
    from uue.train import UUETrainer
    from uue.train.ray import run_training

    s3, s3_uri = s3_bucket
    pafs.copy_files(str(sample_data_dir), "uue/raw", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"

    def config(name: str, *extra: str):
        return load_config(tiny, [f"training.output_dir={tmp_path / name}", "training.max_steps=3",
                                  "training.log_every_steps=1", "model.dropout=0.0", "model.negative_sampling=none",
                                  "model.num_negative_samples=0", "distributed.zero_stage=0", *extra])

    preprocess(s3_uri("raw"), s3_uri("pre"), config("prep"), max_actors=1, batch_size=16)
    local = UUETrainer(config("local", f"data.path={s3_uri('pre')}")).fit()
    ray_run = run_training(config("ray", f"data.path={s3_uri('pre')}"))
    assert ray_run.steps == local.steps == 3 and "testing:testing" not in str(ray_run.model_dir)
    ray_losses = [json.loads(line)["loss"] for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ray_losses, [h["loss"] for h in local.history], rtol=2e-4)


def test_ray_shards_equal_the_single_process_shards(ray_session, sample_data_dir, tmp_path, tiny_model_config):
    """The users' labels are grouped inside Ray Data, not in the driver: the shards equal `preprocess_local`'s
    row for row (each user's labels in input order, across two label files that interleave users), and so do
    the statements, the labels table and the counts."""
    from uue.data.featurize import Featurizer
    from uue.data.preprocess import MANIFEST, preprocess
    from uue.data.readers import load_dataset
    from uue.data.shards import preprocess_local

    raw = tmp_path / "raw"
    for table in ("users", "statements"):
        _write_jsonl(raw / f"{table}.jsonl", [json.dumps(r) for r in _sample_records(sample_data_dir, table)])
    labels = _sample_records(sample_data_dir, "labels")
    rng = np.random.default_rng(0)
    labels = [labels[i] for i in rng.permutation(len(labels))]  # each user's labels spread over both files
    half = len(labels) // 2
    _write_jsonl(raw / "labels" / "part-0.jsonl", [json.dumps(r) for r in labels[:half]])
    _write_jsonl(raw / "labels" / "part-1.jsonl", [json.dumps(r) for r in labels[half:]])
    config = tiny_model_config

    preprocess(str(raw), str(tmp_path / "ray"), config, max_actors=2, batch_size=8)
    featurizer = Featurizer(config, load_tokenizer(config.user_model_name), load_tokenizer(config.item_model_name))
    preprocess_local(load_dataset(raw), str(tmp_path / "local"), config, featurizer, "train")

    def rows(folder: str, table: str, key: str) -> list[dict]:
        return sorted(pq.read_table(tmp_path / folder / table).to_pylist(), key=lambda r: r[key])

    ray_users, local_users = rows("ray", "users", "user_id"), rows("local", "users", "user_id")
    assert len(ray_users) == 48 and sum(1 for r in ray_users if r["label_statements"]) > 30
    assert ray_users == local_users
    assert rows("ray", "statements", "statement_index") == rows("local", "statements", "statement_index")
    label_key = ("user_id", "statement_id", "split")
    assert sorted(pq.read_table(tmp_path / "ray" / "labels").to_pylist(), key=lambda r: [r[k] for k in label_key]) \
        == sorted(pq.read_table(tmp_path / "local" / "labels").to_pylist(), key=lambda r: [r[k] for k in label_key])
    manifests = [json.loads((tmp_path / folder / MANIFEST).read_text()) for folder in ("ray", "local")]
    assert manifests[0]["counts"] == manifests[1]["counts"]
