"""A cache folder (model.caching.cache_dir, or UUE_CHUNK_CACHE_DIR which overrides it): frozen-backbone chunk and
statement vectors survive the process that computed them."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

import uue.model.cache as frozen_prefix
from uue.config import load_config
from uue.data.featurize import Featurizer
from uue.data.readers import load_dataset
from uue.model.cache import CACHE_DIR_ENV, FrozenPrefixCache, resolve_cache_dir
from uue.model.encode import UserBatchEncoder
from uue.model.uue_model import UUEModel


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the tables this process shares, as a new process would start."""
    monkeypatch.setattr(frozen_prefix._Table, "_open", weakref.WeakValueDictionary())


def test_vectors_come_back_from_disk_in_a_fresh_cache(tiny_model_config, sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    _new_process(monkeypatch)
    config = tiny_model_config.model_copy(update={"freeze_user_backbone": True, "cache_chunk_vectors": True})
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    dataset = load_dataset(sample_data_dir)
    users = list(dataset.users.values())[:4]
    distinct = len({tuple(t) for u in users for t in featurizer.user_tokens(u)})

    def encoder(backbone_of: UUEModel = model) -> UserBatchEncoder:  # evaluation's, with the cache folder
        cache = FrozenPrefixCache(backbone_of.user_tower.encoder, backbone_of.user_tokenizer,
                                  cache_dir=resolve_cache_dir(None), shared=True)
        return UserBatchEncoder(backbone_of.user_tower, featurizer, cache=cache)

    first, baseline = encoder(), encoder()  # same backbone, same table
    writes = []
    dump = frozen_prefix.pickle.dump
    monkeypatch.setattr(frozen_prefix.pickle, "dump", lambda *args, **kw: writes.append(1) or dump(*args, **kw))
    computed = first.chunk_vectors(users)
    assert first.cache.encoded == distinct
    assert len(list(tmp_path.glob("frozen-prefix-*.pkl"))) == 1  # the file the training loop's cache reads
    baseline.chunk_vectors(users)
    assert baseline.cache.encoded == 0 and len(writes) == 1  # what `first` wrote is not written again
    monkeypatch.setattr(frozen_prefix.pickle, "dump", dump)
    _new_process(monkeypatch)
    again = encoder()
    for got, want in zip(again.chunk_vectors(users), computed, strict=True):
        np.testing.assert_array_equal(got, want)
    assert again.cache.encoded == 0  # nothing left to encode
    rows = [{"user_id": u.user_id, "chunk_tokens": featurizer.user_tokens(u)} for u in users]
    training = FrozenPrefixCache(model.user_tower.encoder, model.user_tokenizer, cache_dir=str(tmp_path))
    for got, want in zip(training.user_chunks(rows), computed, strict=True):  # a training run after the evaluation
        np.testing.assert_array_equal(np.stack(got), want)
    assert training.encoded == 0
    other = UUEModel.from_config(config, seed=5)  # other weights: another fingerprint, another file
    other_encoder = encoder(other)
    other_encoder.chunk_vectors(users)
    assert other_encoder.cache.encoded == distinct and len(list(tmp_path.glob("frozen-prefix-*.pkl"))) == 2

    # Statements, as the training loop's statement table encodes them: in table order, 64 at a time.
    statements = featurizer.statement_tokens(list(dataset.statements.values())[:6])
    items = FrozenPrefixCache(model.item_tower.encoder, model.item_tokenizer, cache_dir=str(tmp_path))
    vectors = items.lookup(statements, by_length=False, micro_batch=64)
    items.save()
    assert len(list(tmp_path.glob("frozen-prefix-*.pkl"))) == 3  # the item backbone has weights of its own
    _new_process(monkeypatch)
    loaded = FrozenPrefixCache(model.item_tower.encoder, model.item_tokenizer, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(np.stack(loaded.lookup(statements)), np.stack(vectors))
    assert loaded.encoded == 0 and len(loaded.lookup(statements[:5])) == 5


def test_training_chunk_cache_reads_back_what_an_earlier_run_wrote(tiny_model_config, sample_data_dir, tmp_path,
                                                                    monkeypatch):
    """The training loop's cache: a second run on the same frozen backbone encodes nothing."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    config = tiny_model_config.model_copy(update={"freeze_user_backbone": True, "cache_chunk_vectors": True})
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    users = list(load_dataset(sample_data_dir).users.values())
    rows = [{"user_id": u.user_id, "chunk_tokens": featurizer.user_tokens(u)} for u in users]

    def cache(backbone_of: UUEModel = model) -> FrozenPrefixCache:
        return FrozenPrefixCache(backbone_of.user_tower.encoder, backbone_of.user_tokenizer,
                                 cache_dir=resolve_cache_dir(None))

    first = cache()
    computed = first.user_chunks(rows[:1])  # one user's chunks, fewer than 64: nothing written yet
    assert 0 < len(first.entries) < 64 and list(tmp_path.glob("frozen-prefix-*.pkl")) == []
    computed += first.user_chunks(rows[1:])  # the rest of the first epoch
    first.user_chunks(rows[:2])  # the second epoch's first batch needs no encoding: the pending vectors are written
    assert len(list(tmp_path.glob("frozen-prefix-*.pkl"))) == 1

    _new_process(monkeypatch)
    again = cache()
    encoded = []
    monkeypatch.setattr(again, "_encode", lambda ids, mask: encoded.append(ids) or first._encode(ids, mask))
    for got, want in zip(again.user_chunks(rows), computed, strict=True):
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert encoded == []  # all from disk
    changed = [{**rows[0], "chunk_tokens": [*rows[0]["chunk_tokens"], [1, 2, 3]]}]
    again.users.clear()
    (vectors,) = again.user_chunks(changed)  # the same user with a new chunk: only that chunk is encoded
    assert [len(ids) for ids in encoded] == [1] and len(vectors) == len(changed[0]["chunk_tokens"])
    other = UUEModel.from_config(config, seed=5)  # other weights: another file, nothing shared
    assert cache(other).entries == {}


def test_the_config_key_names_the_folder_and_the_environment_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    configured = load_config(None, [f"model.caching.cache_dir={tmp_path / 'configured'}"]).model.caching.cache_dir
    assert resolve_cache_dir(configured) == str(tmp_path / "configured") and resolve_cache_dir(None) is None
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir(configured) == str(tmp_path / "env")
