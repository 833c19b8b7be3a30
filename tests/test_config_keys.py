"""Every model key is set by a shipped config or a test, and does what it says: the keys no config sets are
shown here (the temperature's learning and bound, the semi-hard margin, the warmup, the packed kernel, recompute
granularity and narrowest pack)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from uue.config import SECTION_OF, ModelConfig
from uue.model import UUEModel
from uue.model.inputs import StatementBatch, TowerInput
from uue.train.samplers import build_samplers
from uue.train.step import TorchOptimization, train_step, warmup_cosine

REPO = Path(__file__).resolve().parent.parent


def test_every_model_key_is_set_by_a_shipped_config_or_a_test():
    """A key nothing sets is a knob nobody measured: remove it, or set it in a test that shows what it does."""
    texts = [p.read_text() for p in [*(REPO / "configs").glob("*.yaml"), *(REPO / "tests").glob("*.py")]]
    unset = [key for key in SECTION_OF if not any(re.search(rf"\b{key}\b", text) for text in texts)]
    assert not unset, f"model keys no shipped config or test sets: {unset}"


def test_a_fixed_temperature_stays_and_the_bound_holds_in_training_and_on_disk(tiny_model_config, sample_batches,
                                                                                 tmp_path):
    fixed = tiny_model_config.model_copy(update={"temperature": 0.05, "learn_temperature": False})
    trainer, batches = sample_batches(fixed, steps=2)
    optimization = TorchOptimization(trainer.model, fixed, 10)
    for batch in batches:
        train_step(trainer.objective, batch, optimization)
    assert float(trainer.model.clamped_logit_scale().detach()) == pytest.approx(20.0, rel=1e-6)  # 1 / temperature, kept

    bounded = tiny_model_config.model_copy(update={"temperature": 0.05, "max_logit_scale": 10.0})
    trainer, batches = sample_batches(bounded, steps=2)
    model = trainer.model
    assert float(model.clamped_logit_scale().detach()) == pytest.approx(10.0, rel=1e-6)  # 20 asked, 10 allowed
    optimization = TorchOptimization(model, bounded, 10)
    for batch in batches:
        train_step(trainer.objective, batch, optimization)
    assert float(model.logit_scale.detach()) <= math.log(10.0) + 1e-6
    back = UUEModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert back.config.loss.max_logit_scale == 10.0 and float(back.clamped_logit_scale().detach()) <= 10.0 + 1e-5


def test_the_semi_hard_margin_sets_the_window(tiny_model_config):
    config = tiny_model_config.model_copy(update={"negatives": {"negative_sampling": "semi_hard",
                                                                "num_negative_samples": 2, "semi_hard_margin": 0.05}})
    generator = torch.Generator().manual_seed(0)
    pool_vectors = torch.nn.functional.normalize(torch.randn(60, 8, generator=generator), dim=-1)
    pool = StatementBatch(TowerInput(torch.zeros(60, 3, dtype=torch.long), torch.ones(60, 3, dtype=torch.long)))
    sampler = build_samplers(config, pool, seed=0).negative
    assert sampler.margin == 0.05
    sampler.pool_vectors = pool_vectors
    user = pool_vectors[:1] + 0.1 * pool_vectors[1:2]
    scores = (user @ pool_vectors.T)[0]
    positive = int(scores.argsort(descending=True)[10])
    positive_score = float(scores[positive])
    in_window = {i for i in range(60) if positive_score - 0.05 <= float(scores[i]) < positive_score}
    assert len(in_window) >= 2  # the window holds enough candidates: the picks come from it alone
    picked = set(sampler.select(user, torch.tensor([[positive]]), torch.tensor([positive_score]))[0].tolist())
    assert picked <= in_window


def test_warmup_ratio_shapes_the_learning_rate(tiny_model_config):
    config = tiny_model_config.model_copy(update={"optim": {"warmup_ratio": 0.25, "learning_rate": 1e-3,
                                                            "head_learning_rate": 1e-2}})
    model = UUEModel.from_config(config)
    optimization = TorchOptimization(model, config, total_steps=8)
    factor = warmup_cosine(8, 0.25)  # two warmup steps
    assert optimization.learning_rates()["head"] == pytest.approx(1e-2 * factor(0)) == pytest.approx(5e-3)
    assert factor(1) == pytest.approx(1.0)


def test_pack_backend_and_checkpoint_granularity_reach_the_packed_towers():
    config = ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4,
                         max_chunk_length=32, max_statement_length=16, max_context_length=0,
                         packing={"attention": "packed", "pack_tokens": 64, "pack_backend": "sdpa_mask",
                                  "checkpoint_granularity": "layers", "pack_min_tokens": 32})
    model = UUEModel.from_config(config)
    user_options = model.user_tower.encoder._packed.options
    assert (user_options.backend, user_options.checkpointing) == ("sdpa_mask", "layers")
    assert user_options.widths(longest=8) == [64, 32]  # pack_min_tokens: the narrowest pack (default 64 // 32 = 2)
    assert model.item_tower.encoder._packed.options.checkpointing == "none"  # statements are not recomputed
    flex = UUEModel.from_config(config.model_copy(update={"pack_backend": "flex"}))
    ids = torch.randint(5, 100, (2, 1, 8))
    chunks = TowerInput(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="flex has no backward on CPU"):  # the kernel asked for is the one used
        flex.user_tower(chunks, torch.ones(2, 1, dtype=torch.bool))
