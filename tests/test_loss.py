"""InfoNCE: temperature, false-negative masking, sampled negatives and the three sampling strategies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from uue.model import StatementBatch, TowerInput, UUEModel
from uue.train.loss import EncodedBatch, InfoNCELoss
from uue.train.negatives import NegativeSampler
from uue.train.step import TorchOptimization, train_step


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _batch(owner, statements, valid, positives) -> SimpleNamespace:
    """The columns of a collated batch that the loss reads."""
    width = max(len(p) for p in positives)
    return SimpleNamespace(item_owner=torch.tensor(owner), statement_index=torch.tensor(statements),
                           item_valid=torch.tensor(valid),
                           user_positives=torch.tensor([list(p) + [-1] * (width - len(p)) for p in positives]))


def _reference_loss(users, items, scale, owner, statements, valid, positives, negatives=None):
    """Plain-Python user-centric InfoNCE: a row per valid slot; columns that are positives of the row's user
    (user->statement) or users the row's statement is positive for (statement->user) are left out."""
    rows = [m for m in range(len(items)) if valid[m]]
    total_u2s = total_s2u = 0.0
    for m in range(len(items)):
        if not valid[m]:
            continue
        u = owner[m]
        cols = [j for j in rows if j == m or statements[j] not in positives[u]]
        logits = [scale * float(users[u] @ items[j]) for j in cols]
        if negatives is not None:
            logits += [scale * float(users[u] @ n) for n in negatives[u]]
        pos = scale * float(users[u] @ items[m])
        total_u2s += -pos + math.log(sum(math.exp(v) for v in logits))
        cols = [k for k in range(len(users)) if k == u or statements[m] not in positives[k]]
        logits = [scale * float(items[m] @ users[k]) for k in cols]
        total_s2u += -pos + math.log(sum(math.exp(v) for v in logits))
    return (total_u2s + total_s2u) / 2 / len(rows)


def test_loss_matches_reference_and_never_treats_a_users_positive_as_negative():
    users, items = _unit(3, 8, seed=0), _unit(6, 8, seed=1)
    scale = torch.tensor([10.0])
    # Two slots per user; user 2 has one positive, so its second slot is padding. Statement 7 is positive
    # for users 0 and 1, statement 8 (user 0's) is not drawn for user 0 but is user 1's drawn one.
    positives = [{7, 8}, {7, 9}, {10}]
    owner, statements, valid = [0, 0, 1, 1, 2, 2], [7, 8, 9, 7, 10, 10], [True, True, True, True, True, False]
    batch = _batch(owner, statements, valid, [sorted(p) for p in positives])
    loss, metrics = InfoNCELoss()(EncodedBatch(users, items, scale), batch)
    expected = _reference_loss(users, items, 10.0, owner, statements, valid, positives)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["positives_in_batch"]) == 5
    # The masks matter: treating the users' other positives as negatives gives another loss.
    assert abs(expected - _reference_loss(users, items, 10.0, owner, statements, valid,
                                          [set() for _ in positives])) > 1e-3


def test_sampled_negatives_are_extra_user_to_statement_columns():
    users, items, negatives = _unit(4, 8, seed=2), _unit(4, 8, seed=3), _unit(4, 3, 8, seed=4)
    scale = torch.tensor([5.0])
    batch = _batch([0, 1, 2, 3], [0, 1, 2, 3], [True] * 4, [[0], [1], [2], [3]])
    loss, _ = InfoNCELoss()(EncodedBatch(users, items, scale, negatives), batch)
    positives = [{0}, {1}, {2}, {3}]
    assert float(loss) == pytest.approx(_reference_loss(users, items, 5.0, [0, 1, 2, 3], [0, 1, 2, 3], [True] * 4,
                                                        positives, negatives), rel=1e-5)
    without, _ = InfoNCELoss()(EncodedBatch(users, items, scale), batch)
    assert float(loss) > float(without)


def test_temperature_is_1d_clamped_and_learned(tiny_model_config, sample_batches):
    model = UUEModel.from_config(tiny_model_config.model_copy(update={"temperature": 0.05}))
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    assert float(model.clamped_logit_scale().detach()) == pytest.approx(20.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.clamped_logit_scale().detach()) == pytest.approx(100.0, rel=1e-5)  # open_clip's bound
    model.clamp_logit_scale_()
    assert float(model.logit_scale) == pytest.approx(math.log(100), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    trainer, (batch,) = sample_batches(model.config, model=model)
    before = float(model.logit_scale)
    train_step(trainer.objective, batch, TorchOptimization(model, model.config, total_steps=10))
    assert float(model.logit_scale) != before


def _sampler(strategy: str, k: int, pool_vectors: torch.Tensor, margin=0.2) -> NegativeSampler:
    pool = StatementBatch(TowerInput(torch.zeros(len(pool_vectors), 4, dtype=torch.long),
                                     torch.ones(len(pool_vectors), 4, dtype=torch.long)))
    sampler = NegativeSampler(strategy, k, pool, margin=margin, seed=0)
    sampler.pool_vectors = pool_vectors
    return sampler


def _positives(*rows: set[int]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([sorted(r) + [-1] * (width - len(r)) for r in rows])


def test_random_negatives_exclude_positives_and_vary():
    sampler = _sampler("random", 3, _unit(20, 4, seed=5))
    seen = set()
    for _ in range(30):
        picked = sampler.select(_unit(2, 4, seed=6), _positives({0, 1, 2, 3}, {5}))
        assert not set(picked[0].tolist()) & {0, 1, 2, 3} and 5 not in picked[1].tolist()
        assert len(set(picked[0].tolist())) == 3  # no repeats within a row
        seen.update(picked[0].tolist())
    assert len(seen) >= 12  # spreads over the pool


def test_hard_negatives_are_the_top_scoring_non_positives():
    user = _unit(1, 8, seed=7)
    pool = _unit(30, 8, seed=8)
    scores = (user @ pool.T)[0]
    order = scores.argsort(descending=True).tolist()
    positives = _positives({order[0], order[2]})  # the best and third-best statements are the user's positives
    picked = _sampler("hard", 3, pool).select(user, positives)[0].tolist()
    assert picked == [order[1], order[3], order[4]]


def test_semi_hard_negatives_fall_in_the_margin_window_below_the_positive():
    user = _unit(1, 8, seed=9)
    pool = _unit(200, 8, seed=10)
    scores = (user @ pool.T)[0]
    positive_index = int(scores.argsort(descending=True)[40])  # a mid-ranked positive
    positive_score = float(scores[positive_index])
    sampler = _sampler("semi_hard", 4, pool, margin=0.1)
    picked = sampler.select(user, _positives({positive_index}), torch.tensor([positive_score]))[0]
    window = [(positive_score - 0.1) <= float(scores[i]) < positive_score for i in picked.tolist()]
    assert all(window), [float(scores[i]) for i in picked]
    assert positive_index not in picked.tolist()
    # Harder-than-positive statements (the top 40) are never semi-hard negatives.
    assert not set(picked.tolist()) & set(scores.argsort(descending=True)[:40].tolist())


def test_semi_hard_tops_up_when_the_window_is_too_small():
    user = _unit(1, 8, seed=11)
    pool = _unit(50, 8, seed=12)
    scores = (user @ pool.T)[0]
    positive_index = int(scores.argmax())
    sampler = _sampler("semi_hard", 5, pool, margin=1e-6)
    picked = sampler.select(user, _positives({positive_index}), scores[positive_index : positive_index + 1])[0].tolist()
    order = [i for i in scores.argsort(descending=True).tolist() if i != positive_index]
    assert picked == order[:5]  # empty window: the next-hardest below it


def test_negatives_flow_through_the_model_forward(tiny_model_config, sample_batches):
    cfg = tiny_model_config.model_copy(update={"num_negative_samples": 3, "negative_sampling": "random"})
    model = UUEModel.from_config(cfg)
    trainer, (batch,) = sample_batches(cfg, model=model)
    out = trainer.objective.encode(batch)
    assert out.negatives.shape == (8, 3, cfg.embedding_dim)
    for positives, row in zip(batch.user_positives.tolist(), out.negative_ids.tolist(), strict=True):
        assert not set(row) & set(positives)  # never one of the user's positives, drawn or not
    loss, _ = InfoNCELoss()(out, batch)
    loss.backward()
    assert model.item_tower.projection.weight.grad is not None


def test_unknown_strategy_and_small_pool_are_errors():
    with pytest.raises(ValueError, match="unknown negative_sampling"):
        _sampler("hardest", 2, _unit(5, 4, seed=0))
    with pytest.raises(ValueError, match="must be larger"):
        _sampler("random", 5, _unit(5, 4, seed=0))
