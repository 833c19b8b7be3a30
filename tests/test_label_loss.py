"""The pointwise label loss and the low-rank residual projection (the CPU demo's zero-shot-friendly heads)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uue.model import StatementBatch, TowerInput, UUEModel
from uue.model.towers import LowRankResidualProjection
from uue.train.label_loss import UserLabelSampler, label_loss
from uue.train.samplers import build_samplers
from uue.train.step import TorchOptimization, train_step

POOL = StatementBatch(TowerInput(vectors=torch.arange(40, dtype=torch.float32).reshape(10, 4)))
LABELS = {0: [(1, 1), (2, 0), (3, 0), (4, 1)], 1: [(5, 0)], 7: []}


def _label_batch(users: list[int]) -> SimpleNamespace:
    """The label columns a collated batch carries: each user's (statement, 0/1) labels, padded with -1."""
    width = max(len(LABELS[u]) for u in users)
    rows = [LABELS[u] + [(-1, 0)] * (width - len(LABELS[u])) for u in users]
    return SimpleNamespace(label_statements=torch.tensor([[s for s, _ in r] for r in rows]),
                           label_values=torch.tensor([[float(v) for _, v in r] for r in rows]))


def test_sampler_draws_only_each_users_own_labels_uniformly_and_masks_users_without_labels():
    sampler = UserLabelSampler(per_user=16, pool=POOL, seed=3)
    counts: dict[tuple[int, int], int] = {}
    for _ in range(200):
        draw = sampler.sample(_label_batch([0, 1, 7]), torch.device("cpu"))
        assert draw.indices.shape == draw.values.shape == draw.mask.shape == (3, 16)
        pool = POOL.text.vectors
        torch.testing.assert_close(draw.statements.text.vectors.view(3, 16, 4), pool[draw.indices])
        assert draw.mask[:2].all() and not draw.mask[2].any()  # user 7 has no labels
        assert set(zip(draw.indices[1].tolist(), draw.values[1].int().tolist(), strict=True)) == {(5, 0)}
        for pair in zip(draw.indices[0].tolist(), draw.values[0].int().tolist(), strict=True):
            counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) == set(LABELS[0])
    shares = np.array(list(counts.values())) / sum(counts.values())
    np.testing.assert_allclose(shares, 0.25, atol=0.04)  # 3,200 draws: a uniform share is 0.25 +- 0.008


def test_sampler_state_round_trip_repeats_the_draws():
    sampler = UserLabelSampler(per_user=5, pool=POOL, seed=1)
    sampler.sample(_label_batch([0]), torch.device("cpu"))
    state = sampler.state_dict()
    first = sampler.sample(_label_batch([0, 1]), torch.device("cpu")).indices
    sampler.sample(_label_batch([0, 1]), torch.device("cpu"))
    sampler.load_state_dict(state)
    torch.testing.assert_close(sampler.sample(_label_batch([0, 1]), torch.device("cpu")).indices, first)


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 1"):
        UserLabelSampler(per_user=0, pool=POOL)
    batch = SimpleNamespace(label_statements=torch.tensor([[10]]), label_values=torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="outside the pool"):
        UserLabelSampler(per_user=2, pool=POOL).sample(batch, torch.device("cpu"))


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


def test_train_step_adds_the_weighted_label_loss_and_learns_its_bias(tiny_model_config, sample_batches):
    cfg = tiny_model_config.model_copy(update={"label_loss_weight": 2.0, "labels_per_user": 4})
    model = UUEModel.from_config(cfg)
    trainer, (batch,) = sample_batches(cfg, model=model)
    sampler = trainer.samplers.label
    assert isinstance(sampler, UserLabelSampler) and model.label_bias.requires_grad
    assert bool((batch.label_values[batch.label_statements >= 0] == 0).any())  # label-0 ones are drawn too
    metrics = train_step(trainer.objective, batch, TorchOptimization(model, cfg, 10))
    assert metrics["loss"] == pytest.approx(metrics["info_nce"] + 2.0 * metrics["label_loss"], rel=1e-5)
    assert float(model.label_bias.detach()) != 0.0

    plain = tiny_model_config
    assert build_samplers(plain, trainer.inputs.statements, seed=0).label is None
    assert not UUEModel.from_config(plain).label_bias.requires_grad


def _assert_user_is_the_pretrained_mean(model: UUEModel, batch) -> None:
    """An untrained identity-start head: the user vector is the normalised mean of its chunk vectors."""
    users = batch.users
    with torch.no_grad():
        chunks = model.user_tower.chunk_vectors(users.chunks, users.chunk_mask)
        mask = users.chunk_mask.float()[..., None]
        torch.testing.assert_close(model.encode_users(users), F.normalize((chunks * mask).sum(1) / mask.sum(1), dim=-1))


def test_low_rank_projection_starts_at_the_identity_and_moves_only_its_rank(tiny_model_config, sample_batches):
    cfg = tiny_model_config.model_copy(update={
        "embedding_dim": 32, "projection_rank": 2, "use_attention_pooling": False, "label_loss_weight": 1.0,
        "freeze_user_backbone": True, "freeze_item_backbone": True,
    })
    model = UUEModel.from_config(cfg)
    assert isinstance(model.user_tower.projection, LowRankResidualProjection)
    trainer, batches = sample_batches(cfg, steps=4, model=model)
    _assert_user_is_the_pretrained_mean(model, batches[0])
    optimization = TorchOptimization(model, cfg, 20)
    for step_batch in batches:
        train_step(trainer.objective, step_batch, optimization)
    for tower in (model.user_tower, model.item_tower):
        correction = tower.projection.up.weight @ tower.projection.down.weight
        assert torch.linalg.matrix_rank(correction) == 2  # trained, and confined to 2 directions


def test_gelu_user_correction_starts_at_the_identity_trains_nonlinear_and_keeps_the_item_head_exportable(
        tiny_model_config, sample_batches, tmp_path):
    from uue.model.export import metadata_free_projection

    cfg = tiny_model_config.model_copy(update={
        "embedding_dim": 32, "projection_rank": 4, "user_projection_activation": "gelu", "use_attention_pooling": False,
        "label_loss_weight": 1.0, "freeze_user_backbone": True, "freeze_item_backbone": True,
    })
    model = UUEModel.from_config(cfg)
    trainer, batches = sample_batches(cfg, steps=4, model=model)
    _assert_user_is_the_pretrained_mean(model, batches[0])  # untrained, as with the affine correction
    optimization = TorchOptimization(model, cfg, 20)
    for step_batch in batches:
        train_step(trainer.objective, step_batch, optimization)
    user_head, item_head = model.user_tower.projection, model.item_tower.projection
    assert not user_head.is_affine and item_head.is_affine
    a, b = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # an affine f has f(a + b) - f(a) - f(b) + f(0) == 0; the trained user head does not
        defect = user_head(a + b) - user_head(a) - user_head(b) + user_head(torch.zeros(32))
    assert defect.abs().max() > 1e-4
    weight, bias = metadata_free_projection(model.item_tower)  # the statement tower still exports as one Dense
    with torch.no_grad():
        torch.testing.assert_close(a @ weight.T + bias, item_head(a))
    back = UUEModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert back.config.user_projection_activation == "gelu"
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.encode_users(batches[0].users), model.encode_users(batches[0].users))


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
