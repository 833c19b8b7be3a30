"""The frozen-backbone chunk cache: training on cached chunk vectors is training on tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uue.config import ConfigError, ExperimentConfig, ModelConfig, TrainingConfig, load_config
from uue.data.featurize import Featurizer, collate
from uue.data.readers import load_dataset
from uue.data.schema import UserChunk, UserData
from uue.model.cache import FrozenPrefixCache, backbone_fingerprint, sequence_key
from uue.model.encode import ModelEmbedder, UserBatchEncoder
from uue.model.inputs import UserBatch
from uue.model.uue_model import UUEModel
from uue.train import UUETrainer


def _frozen(tiny_model_config: ModelConfig, cache: bool) -> ModelConfig:
    return tiny_model_config.model_copy(update={"freeze_user_backbone": True, "cache_chunk_vectors": cache})


def _cached_encoder(model: UUEModel, featurizer: Featurizer, shared: bool = True) -> UserBatchEncoder:
    """Evaluation's user encoder: chunks through a frozen-prefix cache (`shared`: the process's table)."""
    cache = FrozenPrefixCache(model.user_tower.encoder, model.user_tokenizer, shared=shared)
    return UserBatchEncoder(model.user_tower, featurizer, cache=cache)


def test_cached_chunk_vectors_equal_the_towers_own(tiny_model_config, sample_data_dir):
    config = _frozen(tiny_model_config, True)
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    users = list(load_dataset(sample_data_dir).users.values())[:6]
    cached = _cached_encoder(model, featurizer)
    vectors = cached.chunk_vectors(users)
    tokens = UserBatch.from_features(collate([featurizer.user_features(u) for u in users]))
    with torch.no_grad():
        direct = model.user_tower.chunk_vectors(tokens.chunks, tokens.chunk_mask)
    assert [len(v) for v in vectors] == tokens.chunk_mask.sum(1).tolist()
    for user, got in enumerate(vectors):
        torch.testing.assert_close(torch.as_tensor(got), direct[user, : len(got)], rtol=1e-5, atol=1e-5)
    plain = UserBatchEncoder(model.user_tower, featurizer)  # the same users from their tokens
    np.testing.assert_allclose(cached.encode(users), plain.encode(users), rtol=1e-5, atol=1e-5)


def test_a_chunk_shared_by_users_is_encoded_once_and_each_user_gets_its_own_vectors(tiny_model_config):
    """One rating line shared by many users (MovieLens with ratings_per_chunk=1): a cache encodes each
    distinct chunk once, caches of one backbone share a table, and every user's vectors equal encoding that
    user alone."""
    config = _frozen(tiny_model_config, True)
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    lines = ["Fargo (1996): 5", "Heat (1995): 4", "Fargo (1996): 1", "Babe (1995): 3"]
    users = [UserData(f"u{i}", [UserChunk(lines[j], "movielens", f"2000-01-0{j + 1}T00:00:00Z") for j in picks])
             for i, picks in enumerate([(0, 1), (1, 0, 3), (2,), (0, 2, 3)])]
    expected = [_cached_encoder(model, featurizer, shared=False).chunk_vectors([u])[0] for u in users]
    encoded = []
    original = model.user_tower.encoder.forward
    model.user_tower.encoder.forward = lambda ids, mask: encoded.append(len(ids)) or original(ids, mask)
    together = _cached_encoder(model, featurizer)
    together_vectors = together.chunk_vectors(users)
    rows = [{"user_id": u.user_id, "chunk_tokens": featurizer.user_tokens(u)} for u in users]
    token_cache = FrozenPrefixCache(model.user_tower.encoder, model.user_tokenizer)  # not shared: its own table
    from_tokens = token_cache.user_chunks(rows[:2]) + token_cache.user_chunks(rows[2:])
    baseline_view = _cached_encoder(model, featurizer)
    baseline_view.chunk_vectors(users)
    assert baseline_view.cache.encoded == 0  # same backbone, same process: the table is shared
    model.user_tower.encoder.forward = original
    assert sum(encoded) == 2 * len(lines)  # 9 chunks, 4 distinct, in each of the two tables
    assert token_cache.encoded == len(lines)
    for want, got, rows_got in zip(expected, together_vectors, from_tokens, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.stack(rows_got), want, rtol=1e-5, atol=1e-6)


def test_training_on_the_cache_matches_training_on_tokens(tiny_model_config, sample_data_dir, tmp_path):
    """Both towers frozen, random negatives on: caching chunk and statement vectors changes nothing."""
    runs = []
    for cache in (False, True):
        model_config = _frozen(tiny_model_config, cache).model_copy(update={
            "freeze_item_backbone": True, "cache_statement_vectors": cache, "negative_sampling": "random",
            "num_negative_samples": 2})
        config = ExperimentConfig(model=model_config,
                                  training=TrainingConfig(output_dir=str(tmp_path / str(cache)), max_steps=3,
                                                          progress_bar=False))
        config.data.path = str(sample_data_dir)
        trainer = UUETrainer(config)
        result = trainer.fit()
        runs.append((np.array([h["loss"] for h in result.history]), trainer.model.state_dict()))
    (loss_tokens, state_tokens), (loss_cached, state_cached) = runs
    np.testing.assert_allclose(loss_cached, loss_tokens, rtol=1e-5)
    for name, value in state_tokens.items():
        # atol 1e-4: Adam turns the ~0 gradients of the attention key bias (softmax ignores it) into steps of
        # noise, so float differences of the two encoding orders show there and nowhere else.
        torch.testing.assert_close(state_cached[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_statements_and_chunks_training_encoded_are_not_encoded_again_after_it(tiny_model_config, sample_data_dir,
                                                                                tmp_path):
    """The local trainer's caches join the process's tables: the path's fit, calibration and evaluation after it
    read statements and chunks as training encoded them, and read through the cache they equal the towers' own."""
    model_config = _frozen(tiny_model_config, True).model_copy(update={
        "freeze_item_backbone": True, "cache_statement_vectors": True, "max_chunk_length": 512})
    config = ExperimentConfig(model=model_config, training=TrainingConfig(output_dir=str(tmp_path), max_steps=2,
                                                                          progress_bar=False))
    config.data.path = str(sample_data_dir)
    trainer = UUETrainer(config)
    trainer.fit()
    statements = [trainer.dataset.statements[statement_id] for statement_id in trainer.inputs.statements.ids]
    users = [trainer.dataset.users[user_id] for user_id in trainer.inputs.collate.chunk_cache.users]
    embedder = ModelEmbedder(trainer.model, "cpu", progress=False)
    cached_statements, cached_users = embedder.statements(statements), embedder.users(users)
    assert embedder.statement_encoder.cache.encoded == 0
    # Training splits a chunk longer than max_chunk_length into pieces, evaluation truncates it: only chunks read
    # alike are shared (MovieLens lines all are; here, bytes of the tiny tokenizer, those below 512).
    trained = [tokens for batch in trainer.shards.iter_train_users() for row in batch
               if row["user_id"] in trainer.inputs.collate.chunk_cache.users for tokens in row["chunk_tokens"]]
    read = {sequence_key(tokens) for user in users for tokens in embedder.featurizer.user_tokens(user)}
    not_trained = read - {sequence_key(tokens) for tokens in trained}
    assert len(not_trained) < len(read)
    assert embedder.user_encoder.cache.encoded == len(not_trained)
    uncached = ModelEmbedder(trainer.model, "cpu", progress=False, cache_frozen=False)
    assert uncached.statement_encoder.cache is None and uncached.user_encoder.cache is None
    np.testing.assert_allclose(cached_statements, uncached.statements(statements), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached_users, uncached.users(users), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embedder.statement_encoder.backbone_vectors(statements),
                               uncached.statement_encoder.backbone_vectors(statements), rtol=1e-5, atol=1e-5)


def test_fingerprint_follows_the_weights(tiny_model_config):
    config = _frozen(tiny_model_config, True)
    model = UUEModel.from_config(config, seed=0)
    before = backbone_fingerprint(model.user_tower.encoder, model.user_tokenizer)
    same = backbone_fingerprint(UUEModel.from_config(config, seed=0).user_tower.encoder, model.user_tokenizer)
    with torch.no_grad():
        next(model.user_tower.encoder.parameters()).add_(1.0)
    after = backbone_fingerprint(model.user_tower.encoder, model.user_tokenizer)
    assert before == same != after


def test_cache_without_a_frozen_backbone_is_rejected():
    with pytest.raises(ConfigError, match="cache_chunk_vectors needs freeze_user_backbone"):
        load_config(None, ["model.cache_chunk_vectors=true"])
    with pytest.raises(ConfigError, match="cache_statement_vectors needs freeze_item_backbone"):
        load_config(None, ["model.cache_statement_vectors=true"])
