"""Learning without forgetting (uue.train.distill): anchors from the users' histories, the teacher, the loss,
training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uue.config import ConfigError, load_config
from uue.data.featurize import Featurizer, chunk_text
from uue.data.schema import UserChunk
from uue.model.backbone import TINY_HIDDEN, build_byte_tokenizer
from uue.model.inputs import StatementBatch, TowerInput
from uue.train.distill import AnchorSampler, distillation_loss, history_anchor_texts


def test_loss_is_zero_for_the_teachers_ranking_whatever_its_scale_and_two_for_the_reverse():
    generator = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    anchors = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    assert float(distillation_loss(users, anchors, users, anchors)) == pytest.approx(0.0, abs=1e-6)
    # A teacher whose scores are the student's times 3 ranks users alike: a correlation ignores scale.
    assert float(distillation_loss(users, anchors, 3 * users, anchors)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(users, anchors, -users, anchors)) == pytest.approx(2.0, abs=1e-6)
    unrelated = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    assert 0.2 < float(distillation_loss(unrelated, anchors, users, anchors)) < 1.8


def test_anchor_texts_are_distinct_history_chunks_without_the_platform_prefix_and_repeat_with_the_seed():
    tokenizer = build_byte_tokenizer("right")
    lines = [f"Film number {i} (1999): {1 + i % 5}" for i in range(40)]

    def rows():  # two users who share half of their chunks, as user-row batches of the shards
        for first in (0, 20):
            texts = [chunk_text(UserChunk(line, platform="movielens")) for line in lines[first:first + 30]]
            yield [{"chunk_tokens": tokenizer(texts)["input_ids"]}]

    featurizer = Featurizer(load_config(None).model, tokenizer, tokenizer)
    drawn = history_anchor_texts(rows(), featurizer, count=25, seed=3)
    assert len(drawn) == len(set(drawn)) == 25
    assert set(drawn) <= set(lines)  # decoded back to the history text, "[movielens]" dropped
    assert drawn == history_anchor_texts(rows(), featurizer, count=25, seed=3)
    assert drawn != history_anchor_texts(rows(), featurizer, count=25, seed=4)
    assert sorted(history_anchor_texts(rows(), featurizer, count=100, seed=0)) == sorted(lines)  # fewer than asked


def test_sampler_state_round_trip_repeats_the_draws():
    vectors = torch.as_tensor(np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32))
    sampler = AnchorSampler(StatementBatch(TowerInput(vectors=vectors)), vectors, per_step=6, seed=2)
    state = sampler.state_dict()
    first, teacher = sampler.sample(torch.device("cpu"))
    assert len(first) == 6
    torch.testing.assert_close(F.normalize(first.text.vectors, dim=-1), teacher)
    sampler.load_state_dict(state)
    again, _ = sampler.sample(torch.device("cpu"))
    torch.testing.assert_close(first.text.vectors, again.text.vectors)


def test_config_needs_frozen_cached_backbones_and_mean_pooling():
    with pytest.raises(ConfigError, match="distill_weight needs cache_chunk_vectors"):
        load_config("configs/tiny.yaml", ["model.distill_weight=1"])
    cached = ["model.freeze_user_backbone=true", "model.cache_chunk_vectors=true", "model.freeze_item_backbone=true",
              "model.cache_statement_vectors=true", "model.distill_weight=1"]
    with pytest.raises(ConfigError, match="distill_weight needs mean pooling"):
        load_config("configs/tiny.yaml", [*cached, "model.use_attention_pooling=true"])
    assert load_config("configs/tiny.yaml", [*cached, "model.use_attention_pooling=false"]).model.distill_weight == 1


DISTILLED = {"freeze_user_backbone": True, "cache_chunk_vectors": True, "freeze_item_backbone": True,
             "cache_statement_vectors": True, "use_attention_pooling": False, "distill_weight": 1.0}


def test_anchor_source_and_count_choose_the_anchors_and_the_teacher_is_the_frozen_item_backbone(
        tiny_model_config, sample_batches):
    from uue.train.distill import bank_anchor_texts

    config = tiny_model_config.model_copy(update={**DISTILLED, "distill_anchor_source": "bank"})
    trainer, _ = sample_batches(config)
    bank = bank_anchor_texts()
    sampler = trainer.samplers.anchor
    assert len(sampler.teacher) == len(bank)  # every statement of the bank, in its order
    features = trainer.featurizer.statement_features(bank[:3])
    ids, mask = (torch.as_tensor(features[k]) for k in ("item_input_ids", "item_attention_mask"))
    with torch.no_grad():
        frozen = trainer.model.item_tower.encoder.eval()(ids, mask)
    torch.testing.assert_close(sampler.teacher[:3], F.normalize(frozen, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.statements.text.vectors[:3], frozen, atol=1e-5, rtol=1e-5)

    history, _ = sample_batches(config.model_copy(update={"distill_anchor_source": "history", "distill_anchors": 7}))
    assert len(history.samplers.anchor.teacher) == 7  # drawn from the users' chunks, as many as asked


def _train(tmp_path, name: str, weight: float) -> list[dict]:
    from uue.train import UUETrainer

    config = load_config("configs/tiny.yaml", [
        "model.freeze_user_backbone=true", "model.cache_chunk_vectors=true", "model.freeze_item_backbone=true",
        "model.cache_statement_vectors=true", "model.use_attention_pooling=false", "model.projection_init=identity",
        f"model.embedding_dim={TINY_HIDDEN}", "model.projection_rank=8", "model.label_loss_weight=1",
        f"model.distill_weight={weight}", "model.distill_anchors_per_step=16", "model.head_learning_rate=0.05",
        "training.max_steps=40", "training.log_every_steps=1", f"training.output_dir={tmp_path / name}"])
    UUETrainer(config).fit()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_training_keeps_the_teachers_ranking_in_proportion_to_the_weight(tmp_path):
    light, heavy = _train(tmp_path, "light", 0.01), _train(tmp_path, "heavy", 10.0)
    # Untrained identity heads on frozen vectors are the teacher: the first step's term is zero.
    assert light[0]["distill_loss"] == pytest.approx(0.0, abs=1e-4)
    late = slice(-10, None)
    drift_light = np.mean([m["distill_loss"] for m in light[late]])
    drift_heavy = np.mean([m["distill_loss"] for m in heavy[late]])
    assert drift_light > 0.05 and drift_heavy < drift_light / 3  # the weight is what holds the ranking


def test_the_bank_names_no_statement_family_that_movielens_evaluates():
    from uue.data.movielens import GENRE_WORD_PATTERN, VARIANTS
    from uue.train.distill import bank_anchor_texts

    bank = bank_anchor_texts()
    assert len(bank) >= 150 and len(set(bank)) == len(bank)
    assert not [text for text in bank if GENRE_WORD_PATTERN.search(text)]
    words = {"film", "films", "movie", "movies", "cinema", "man", "woman", "male", "female", "old", "young",
             "children", "grandchildren", "retired", "retiree", "student", "teenager"}
    occupations = {key.split("_")[0] for variant in VARIANTS.values() for key in variant.occupations}
    assert not [text for text in bank if set(text.lower().split()) & (words | occupations)]
