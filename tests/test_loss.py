"""InfoNCE: temperature, false-negative masking, sampled negatives and the three sampling strategies."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uue.data.featurize import Featurizer
from uue.data.pairs import PairBatches
from uue.data.readers import load_dataset
from uue.loss import InfoNCELoss
from uue.model import UUEModel, UUEOutput
from uue.negatives import NegativeSampler
from uue.training import TorchOptimization, train_step


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference_loss(users, items, scale, u2s_drop, s2u_drop, negatives=None):
    """Plain-Python symmetric InfoNCE: each row's CE over the columns it keeps (drop lists per row)."""
    total_u2s = total_s2u = 0.0
    for i in range(len(users)):
        cols = [j for j in range(len(items)) if j not in u2s_drop.get(i, ())]
        logits = [scale * float(users[i] @ items[j]) for j in cols]
        if negatives is not None:
            logits += [scale * float(users[i] @ n) for n in negatives[i]]
        pos = scale * float(users[i] @ items[i])
        total_u2s += -pos + math.log(sum(math.exp(v) for v in logits))
        cols = [j for j in range(len(users)) if j not in s2u_drop.get(i, ())]
        logits = [scale * float(items[i] @ users[j]) for j in cols]
        total_s2u += -pos + math.log(sum(math.exp(v) for v in logits))
    n = len(users)
    return (total_u2s / n + total_s2u / n) / 2


def test_loss_matches_reference_and_masks_shared_statements_and_users():
    users, items = _unit(5, 8, seed=0), _unit(5, 8, seed=1)
    scale = torch.tensor([10.0])
    user_ids = torch.tensor([0, 1, 2, 3, 0])  # user 0 appears twice (two positives)
    statement_ids = torch.tensor([7, 7, 8, 9, 10])  # statement 7 is positive for users 0 and 1
    loss, metrics = InfoNCELoss()(UUEOutput(users, items, scale), user_ids, statement_ids)
    # row 0 must not treat column 1 (same statement) nor column 4 (same user) as negatives, etc.
    drop = {0: {1, 4}, 1: {0}, 4: {0}}
    expected = _reference_loss(users, items, 10.0, drop, drop)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["masked_false_negatives"]) == 4
    unmasked, _ = InfoNCELoss()(UUEOutput(users, items, scale), torch.arange(5), torch.arange(5))
    assert float(unmasked) == pytest.approx(_reference_loss(users, items, 10.0, {}, {}), rel=1e-5)
    assert abs(float(unmasked) - float(loss)) > 1e-3


def test_sampled_negatives_are_extra_user_to_statement_columns():
    users, items, negatives = _unit(4, 8, seed=2), _unit(4, 8, seed=3), _unit(4, 3, 8, seed=4)
    scale = torch.tensor([5.0])
    ids = torch.arange(4)
    loss, _ = InfoNCELoss()(UUEOutput(users, items, scale, negatives), ids, ids)
    assert float(loss) == pytest.approx(_reference_loss(users, items, 5.0, {}, {}, negatives), rel=1e-5)
    without, _ = InfoNCELoss()(UUEOutput(users, items, scale), ids, ids)
    assert float(loss) > float(without)


def test_temperature_is_1d_clamped_and_learned(tiny_model_config, sample_data_dir):
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
    batches = PairBatches(load_dataset(sample_data_dir), Featurizer(model.config, model.user_tokenizer,
                                                                    model.item_tokenizer), 8)
    before = float(model.logit_scale)
    train_step(model, batches.batch(0, 0), InfoNCELoss(), TorchOptimization(model, model.config, total_steps=10))
    assert float(model.logit_scale) != before


def _sampler(strategy: str, k: int, pool_vectors: torch.Tensor, positives, margin=0.2) -> NegativeSampler:
    pool = {"item_input_ids": torch.zeros(len(pool_vectors), 4, dtype=torch.long),
            "item_attention_mask": torch.ones(len(pool_vectors), 4, dtype=torch.long)}
    sampler = NegativeSampler(strategy, k, pool, positives, margin=margin, seed=0)
    sampler.pool_vectors = pool_vectors
    return sampler


def test_random_negatives_exclude_positives_and_vary():
    sampler = _sampler("random", 3, _unit(20, 4, seed=5), {0: {0, 1, 2, 3}, 1: {5}})
    seen = set()
    for _ in range(30):
        picked = sampler.select(_unit(2, 4, seed=6), torch.tensor([0, 1]))
        assert not set(picked[0].tolist()) & {0, 1, 2, 3} and 5 not in picked[1].tolist()
        assert len(set(picked[0].tolist())) == 3  # no repeats within a row
        seen.update(picked[0].tolist())
    assert len(seen) >= 12  # spreads over the pool


def test_hard_negatives_are_the_top_scoring_non_positives():
    user = _unit(1, 8, seed=7)
    pool = _unit(30, 8, seed=8)
    scores = (user @ pool.T)[0]
    order = scores.argsort(descending=True).tolist()
    positives = {0: {order[0], order[2]}}  # the best and third-best statements are the user's positives
    picked = _sampler("hard", 3, pool, positives).select(user, torch.tensor([0]))[0].tolist()
    assert picked == [order[1], order[3], order[4]]


def test_semi_hard_negatives_fall_in_the_margin_window_below_the_positive():
    user = _unit(1, 8, seed=9)
    pool = _unit(200, 8, seed=10)
    scores = (user @ pool.T)[0]
    positive_index = int(scores.argsort(descending=True)[40])  # a mid-ranked positive
    positive_score = float(scores[positive_index])
    sampler = _sampler("semi_hard", 4, pool, {0: {positive_index}}, margin=0.1)
    picked = sampler.select(user, torch.tensor([0]), torch.tensor([positive_score]))[0]
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
    sampler = _sampler("semi_hard", 5, pool, {0: {positive_index}}, margin=1e-6)
    picked = sampler.select(user, torch.tensor([0]), scores[positive_index : positive_index + 1])[0].tolist()
    order = [i for i in scores.argsort(descending=True).tolist() if i != positive_index]
    assert picked == order[:5]  # empty window: the next-hardest below it


def test_negatives_flow_through_the_model_forward(tiny_model_config, sample_data_dir):
    cfg = tiny_model_config.model_copy(update={"num_negative_samples": 3, "negative_sampling": "random"})
    model = UUEModel.from_config(cfg)
    batches = PairBatches(load_dataset(sample_data_dir), Featurizer(cfg, model.user_tokenizer, model.item_tokenizer), 8)
    positives = batches.positives_by_user()
    sampler = NegativeSampler("random", 3, batches.statement_features, positives)
    batch = batches.batch(0, 0)
    out = model(batch, negative_sampler=sampler)
    assert out.negatives.shape == (8, 3, cfg.embedding_dim)
    for user, row in zip(batch["user_index"].tolist(), out.negative_ids.tolist(), strict=True):
        assert not set(row) & positives[user]
    loss, _ = InfoNCELoss()(out, batch["user_index"], batch["statement_index"])
    loss.backward()
    assert model.item_tower.projection.weight.grad is not None


def test_unknown_strategy_and_small_pool_are_errors():
    with pytest.raises(ValueError, match="unknown negative_sampling"):
        _sampler("hardest", 2, _unit(5, 4, seed=0), {})
    with pytest.raises(ValueError, match="must be larger"):
        _sampler("random", 5, _unit(5, 4, seed=0), {})
