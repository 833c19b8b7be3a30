"""UUE_CHUNK_CACHE_DIR: frozen-backbone chunk and statement vectors survive the process that computed them."""

from __future__ import annotations

import numpy as np

import uue.model.cache as chunk_cache
from uue.data.featurize import Featurizer
from uue.data.readers import load_dataset
from uue.model.cache import ChunkVectorCache, TokenChunkCache, statement_vector_features
from uue.model.uue_model import UUEModel


def test_vectors_come_back_from_disk_in_a_fresh_cache(tiny_model_config, sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(chunk_cache.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(chunk_cache, "_SHARED", {})
    config = tiny_model_config.model_copy(update={"freeze_user_backbone": True, "cache_chunk_vectors": True})
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    dataset = load_dataset(sample_data_dir)
    users = list(dataset.users.values())[:4]
    distinct = len({tuple(t) for u in users for t in featurizer.user_tokens(u)})
    first = ChunkVectorCache(model.user_tower.encoder, featurizer, progress=False)
    baseline = ChunkVectorCache(model.user_tower.encoder, featurizer, progress=False)  # same backbone, same table
    writes = []
    save = chunk_cache._save_to_disk
    monkeypatch.setattr(chunk_cache, "_save_to_disk", lambda *args: writes.append(args) or save(*args))
    assert first.precompute(users) == distinct
    assert len(list(tmp_path.glob("chunk-table-*.pkl"))) == 1  # the file training's TokenChunkCache reads
    assert baseline.precompute(users) == 0 and len(writes) == 1  # what `first` wrote is not written again
    monkeypatch.setattr(chunk_cache, "_save_to_disk", save)
    monkeypatch.setattr(chunk_cache, "_SHARED", {})  # as a new process would start
    again = ChunkVectorCache(model.user_tower.encoder, featurizer, progress=False)
    assert again.precompute(users) == 0  # nothing left to encode
    for user in users:
        np.testing.assert_array_equal(again.chunk_vectors(user), first.chunk_vectors(user))
    rows = [{"user_id": u.user_id, "chunk_tokens": featurizer.user_tokens(u)} for u in users]
    training = TokenChunkCache(model.user_tower.encoder, featurizer)  # a training run after the evaluation
    for got, user in zip(training(rows), users, strict=True):
        np.testing.assert_array_equal(got, first.chunk_vectors(user))
    assert training.encoded_chunks == 0
    other = UUEModel.from_config(config, seed=5)  # other weights: another fingerprint, another file
    assert ChunkVectorCache(other.user_tower.encoder, featurizer, progress=False).precompute(users) == distinct

    tokens = featurizer.statement_features(list(dataset.statements.values())[:6])
    computed = statement_vector_features(model.item_tower.encoder, tokens)
    assert len(list(tmp_path.glob("statements-*.pkl"))) == 1
    loaded = statement_vector_features(model.item_tower.encoder, tokens)
    np.testing.assert_array_equal(loaded["item_text_vectors"], computed["item_text_vectors"])
    fewer = featurizer.statement_features(list(dataset.statements.values())[:5])
    assert len(statement_vector_features(model.item_tower.encoder, fewer)["item_text_vectors"]) == 5


def test_training_chunk_cache_reads_back_what_an_earlier_run_wrote(tiny_model_config, sample_data_dir, tmp_path,
                                                                    monkeypatch):
    """The streaming loop's TokenChunkCache: a second run on the same frozen backbone encodes nothing."""
    monkeypatch.setenv(chunk_cache.CACHE_DIR_ENV, str(tmp_path))
    config = tiny_model_config.model_copy(update={"freeze_user_backbone": True, "cache_chunk_vectors": True})
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    users = list(load_dataset(sample_data_dir).users.values())
    rows = [{"user_id": u.user_id, "chunk_tokens": featurizer.user_tokens(u)} for u in users]
    first = TokenChunkCache(model.user_tower.encoder, featurizer)
    computed = first(rows[:1])  # one user's chunks, fewer than 64: nothing written yet
    assert 0 < len(first.chunks) < 64 and list(tmp_path.glob("chunk-table-*.pkl")) == []
    computed += first(rows[1:])  # the rest of the first epoch
    first(rows[:2])  # the second epoch's first batch needs no encoding: the pending vectors are written
    assert len(list(tmp_path.glob("chunk-table-*.pkl"))) == 1

    again = TokenChunkCache(model.user_tower.encoder, featurizer)
    encoded = []
    monkeypatch.setattr(again, "_encode", lambda ids, mask: encoded.append(ids) or first._encode(ids, mask))
    for got, want in zip(again(rows), computed, strict=True):
        np.testing.assert_array_equal(got, want)
    assert encoded == []  # all from disk
    changed = [{**rows[0], "chunk_tokens": [*rows[0]["chunk_tokens"], [1, 2, 3]]}]
    again.entries.clear()
    (vectors,) = again(changed)  # the same user with a new chunk: only that chunk is encoded
    assert [len(ids) for ids in encoded] == [1] and len(vectors) == len(changed[0]["chunk_tokens"])
    other = UUEModel.from_config(config, seed=5)  # other weights: another file, nothing shared
    assert TokenChunkCache(other.user_tower.encoder, featurizer).chunks == {}
