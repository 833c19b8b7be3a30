"""`negative_sampling: labeled`: a user's known-false statements come first, positives never."""

from __future__ import annotations

import numpy as np
import torch

from uue.negatives import NegativeSampler


def test_labeled_negatives_prefer_known_false_and_top_up_at_random():
    pool = {"item_input_ids": np.zeros((10, 4), dtype=np.int64), "item_attention_mask": np.ones((10, 4), np.int64)}
    positives = {0: {0, 1}, 1: {2}}
    known = {0: {5, 7}, 1: {3, 4, 6, 8, 9}}
    sampler = NegativeSampler("labeled", 3, pool, positives, seed=0, known_negatives=known)
    for _ in range(20):
        picked = sampler.select(torch.zeros(2, 4), torch.tensor([0, 1])).tolist()
        assert {5, 7} <= set(picked[0]) and not {0, 1} & set(picked[0])  # both known, then one at random
        assert set(picked[1]) <= known[1] and len(set(picked[1])) == 3  # enough known: only known
    tops = {tuple(sorted(sampler.select(torch.zeros(1, 4), torch.tensor([0]))[0].tolist())) for _ in range(30)}
    assert len(tops) > 1  # the top-up varies


def test_trainer_feeds_the_users_label_zero_statements(tiny_model_config, sample_data_dir, tmp_path):
    from uue.config import ExperimentConfig, TrainingConfig
    from uue.training import UUETrainer

    config = ExperimentConfig(
        model=tiny_model_config.model_copy(update={"negative_sampling": "labeled", "num_negative_samples": 2}),
        training=TrainingConfig(output_dir=str(tmp_path), max_steps=2, progress_bar=False))
    config.data.path = str(sample_data_dir)
    trainer = UUETrainer(config)
    known = trainer.samplers.negative.known_negatives
    dataset = trainer.dataset
    expected = {(lab.user_id, lab.statement_id) for lab in dataset.labels_in("train") if lab.label == 0}
    got = {(trainer.batches.user_ids[u], trainer.batches.statement_ids[s]) for u, ss in known.items() for s in ss}
    assert got == expected and expected
    assert trainer.fit().steps == 2
