"""`negative_sampling: labeled`: a user's known-false statements come first, positives never."""

from __future__ import annotations

import torch

from uue.model import StatementBatch, TowerInput
from uue.train.negatives import NegativeSampler


def test_labeled_negatives_prefer_known_false_and_top_up_at_random():
    pool = StatementBatch(TowerInput(torch.zeros(10, 4, dtype=torch.long), torch.ones(10, 4, dtype=torch.long)))
    positives = torch.tensor([[0, 1], [2, -1]])
    known = torch.tensor([[5, 7, -1, -1, -1], [3, 4, 6, 8, 9]])
    sampler = NegativeSampler("labeled", 3, pool, seed=0)
    for _ in range(20):
        picked = sampler.select(torch.zeros(2, 4), positives, known_negatives=known).tolist()
        assert {5, 7} <= set(picked[0]) and not {0, 1} & set(picked[0])  # both known, then one at random
        assert set(picked[1]) <= {3, 4, 6, 8, 9} and len(set(picked[1])) == 3  # enough known: only known
    tops = {tuple(sorted(sampler.select(torch.zeros(1, 4), positives[:1], known_negatives=known[:1])[0].tolist()))
            for _ in range(30)}
    assert len(tops) > 1  # the top-up varies


def test_trainer_feeds_the_users_label_zero_statements(tiny_model_config, sample_batches):
    cfg = tiny_model_config.model_copy(update={"negative_sampling": "labeled", "num_negative_samples": 2})
    trainer, (batch,) = sample_batches(cfg)
    rows = next(trainer.loop.stream.steps(0, 1)).rows  # the rows that batch was collated from
    ids = trainer.inputs.statements.ids
    known = {(lab.user_id, lab.statement_id) for lab in trainer.dataset.labels_in("train") if lab.label == 0}
    out = trainer.objective.encode(batch)
    # Each sample user has 4 label-0 training statements: both negatives of every user are its own.
    got = [(row["user_id"], ids[s]) for row, negatives in zip(rows, out.negative_ids.tolist(), strict=True)
           for s in negatives]
    assert set(got) <= known and len(set(got)) == 2 * len(rows)
    assert trainer.fit(max_steps=2).steps == 2
