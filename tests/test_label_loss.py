"""The pointwise label loss and the low-rank residual projection (the CPU demo's zero-shot-friendly heads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uue.config import ExperimentConfig
from uue.data.featurize import Featurizer
from uue.data.pairs import PairBatches
from uue.data.readers import load_dataset
from uue.label_loss import UserLabelSampler, label_loss
from uue.loss import InfoNCELoss
from uue.model import UUEModel
from uue.model.towers import LowRankResidualProjection
from uue.training import TorchOptimization, build_samplers, train_step

POOL = {"item_text_vectors": np.arange(40, dtype=np.float32).reshape(10, 4)}
LABELS = {0: [(1, 1), (2, 0), (3, 0), (4, 1)], 1: [(5, 0)]}


def test_sampler_draws_only_each_users_own_labels_uniformly_and_masks_users_without_labels():
    sampler = UserLabelSampler(LABELS, per_user=16, pool_features=POOL, seed=3)
    counts: dict[tuple[int, int], int] = {}
    for _ in range(200):
        draw = sampler.sample(torch.tensor([0, 1, 7]), torch.device("cpu"))
        assert draw.indices.shape == draw.values.shape == draw.mask.shape == (3, 16)
        pool = torch.as_tensor(POOL["item_text_vectors"])
        torch.testing.assert_close(draw.features["text_vectors"], pool[draw.indices])
        assert draw.mask[:2].all() and not draw.mask[2].any()  # user 7 has no labels
        assert set(zip(draw.indices[1].tolist(), draw.values[1].int().tolist(), strict=True)) == {(5, 0)}
        for pair in zip(draw.indices[0].tolist(), draw.values[0].int().tolist(), strict=True):
            counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) == set(LABELS[0])
    shares = np.array(list(counts.values())) / sum(counts.values())
    np.testing.assert_allclose(shares, 0.25, atol=0.04)  # 3,200 draws: a uniform share is 0.25 +- 0.008


def test_sampler_state_round_trip_repeats_the_draws():
    sampler = UserLabelSampler(LABELS, per_user=5, pool_features=POOL, seed=1)
    sampler.sample(torch.tensor([0]), torch.device("cpu"))
    state = sampler.state_dict()
    first = sampler.sample(torch.tensor([0, 1]), torch.device("cpu")).indices
    sampler.sample(torch.tensor([0, 1]), torch.device("cpu"))
    sampler.load_state_dict(state)
    torch.testing.assert_close(sampler.sample(torch.tensor([0, 1]), torch.device("cpu")).indices, first)


@pytest.mark.parametrize(("labels", "message"), [
    ({}, "no"), ({0: [(1, 2)]}, "0 or 1"), ({0: [(10, 1)]}, "outside the pool"),
])
def test_sampler_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        UserLabelSampler(labels, per_user=2, pool_features=POOL)


def test_label_loss_matches_a_plain_python_reference():
    generator = torch.Generator().manual_seed(0)
    user = F.normalize(torch.randn(3, 5, generator=generator), dim=-1)
    items = F.normalize(torch.randn(3, 4, 5, generator=generator), dim=-1)
    values = torch.randint(0, 2, (3, 4), generator=generator).float()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1:] = False
    scale, bias = torch.tensor([7.0]), torch.tensor([-0.3])
    terms = []
    for b in range(3):
        for k in range(4):
            if mask[b, k]:
                z = 7.0 * float(user[b] @ items[b, k]) - 0.3
                p = 1 / (1 + math.exp(-z))
                terms.append(-(float(values[b, k]) * math.log(p) + (1 - float(values[b, k])) * math.log(1 - p)))
    assert float(label_loss(user, items, values, mask, scale, bias)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def _batches(cfg, model, sample_data_dir) -> PairBatches:
    return PairBatches(load_dataset(sample_data_dir), Featurizer(cfg, model.user_tokenizer, model.item_tokenizer),
                       cfg.batch_size)


def build_label_sampler(cfg, batches: PairBatches, seed: int) -> UserLabelSampler | None:
    return build_samplers(cfg, batches.statement_features, batches.positives_by_user(), batches.labels_by_user(),
                          seed).label


def test_train_step_adds_the_weighted_label_loss_and_learns_its_bias(tiny_model_config, sample_data_dir):
    cfg = tiny_model_config.model_copy(update={"label_loss_weight": 2.0, "labels_per_user": 4})
    model = UUEModel.from_config(cfg)
    batches = _batches(cfg, model, sample_data_dir)
    sampler = build_label_sampler(cfg, batches, seed=0)
    assert model.label_bias.requires_grad
    labels = batches.labels_by_user()
    assert any(v == 0 for pairs in labels.values() for _, v in pairs)  # label-0 statements are drawn too
    metrics = train_step(model, batches.batch(0, 0), InfoNCELoss(), TorchOptimization(model, cfg, 10), None, sampler)
    assert metrics["loss"] == pytest.approx(metrics["info_nce"] + 2.0 * metrics["label_loss"], rel=1e-5)
    assert float(model.label_bias.detach()) != 0.0

    plain = tiny_model_config
    assert build_label_sampler(plain, batches, seed=0) is None
    assert not UUEModel.from_config(plain).label_bias.requires_grad


def test_low_rank_projection_starts_at_the_identity_and_moves_only_its_rank(tiny_model_config, sample_data_dir):
    cfg = tiny_model_config.model_copy(update={
        "embedding_dim": 32, "projection_rank": 2, "use_attention_pooling": False, "label_loss_weight": 1.0,
        "freeze_user_backbone": True, "freeze_item_backbone": True,
    })
    model = UUEModel.from_config(cfg)
    assert isinstance(model.user_tower.projection, LowRankResidualProjection)
    batches = _batches(cfg, model, sample_data_dir)
    batch = batches.batch(0, 0)
    with torch.no_grad():  # untrained: the normalised mean of the chunk vectors, i.e. the pretrained space
        chunks = model.user_tower.chunk_vectors(batch["user_input_ids"], batch["user_attention_mask"],
                                                batch["chunk_mask"])
        mask = batch["chunk_mask"].float()[..., None]
        expected = F.normalize((chunks * mask).sum(1) / mask.sum(1), dim=-1)
        torch.testing.assert_close(model.encode_users(batch), expected)
    optimization = TorchOptimization(model, cfg, 20)
    sampler = build_label_sampler(cfg, batches, seed=0)
    for step in range(4):
        train_step(model, batches.batch(0, step % batches.batches_per_epoch), InfoNCELoss(), optimization, None,
                   sampler)
    for tower in (model.user_tower, model.item_tower):
        correction = tower.projection.up.weight @ tower.projection.down.weight
        assert torch.linalg.matrix_rank(correction) == 2  # trained, and confined to 2 directions


def test_low_rank_head_and_label_bias_survive_save_and_load(tiny_model_config, tmp_path):
    cfg = tiny_model_config.model_copy(update={"embedding_dim": 32, "projection_rank": 3, "label_loss_weight": 1.0})
    model = UUEModel.from_config(cfg)
    with torch.no_grad():
        model.label_bias.fill_(-1.25)
        model.item_tower.projection.up.weight.normal_()
    back = UUEModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_low_rank_projection_needs_the_hidden_size(tiny_model_config):
    with pytest.raises(ValueError, match="projection_rank=2 needs embedding_dim == the backbone hidden size"):
        UUEModel.from_config(tiny_model_config.model_copy(update={"projection_rank": 2}))


def test_ray_plan_carries_the_labels_the_samplers_need(tiny_model_config, sample_data_dir):
    from uue.ray_train import TrainingPlan, _build_samplers

    cfg = tiny_model_config.model_copy(update={
        "label_loss_weight": 1.0, "labels_per_user": 2, "negative_sampling": "labeled", "num_negative_samples": 2,
    })
    dataset = load_dataset(sample_data_dir)
    experiment = ExperimentConfig(model=cfg, data={"path": str(sample_data_dir)}, training={"max_steps": 1})
    plan = TrainingPlan.build(dataset, experiment, world_size=1)
    train_labels = list(dataset.labels_in("train"))
    assert sum(len(v) for v in plan.labels.values()) == len(train_labels)
    model = UUEModel.from_config(cfg)
    samplers = _build_samplers(cfg, Featurizer(cfg, model.user_tokenizer, model.item_tokenizer),
                               {"statements": plan.statements, "positives": plan.positives, "labels": plan.labels},
                               seed=0)
    label_sampler, negative_sampler = samplers.label, samplers.negative
    assert isinstance(label_sampler, UserLabelSampler)
    for user, pairs in plan.labels.items():
        assert negative_sampler.known_negatives.get(user, set()) == {s for s, v in pairs if v == 0}
        assert sorted(label_sampler.labels[user].tolist()) == sorted(pairs)
