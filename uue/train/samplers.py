"""The statement samplers of one training process: sampled negatives, the label loss's draws and the
distillation's anchors.

Negatives and label draws come from the statement table (the pool); which statements are a user's positives and
labels travels with each batch row, so a sampler holds no per-user state beyond its RNG. Anchors come from their
own table (uue.train.data.distillation_anchors).
"""

from __future__ import annotations

from dataclasses import dataclass

from uue.config import ModelConfig
from uue.model.inputs import StatementPool
from uue.train.distill import AnchorSampler
from uue.train.label_loss import UserLabelSampler
from uue.train.negatives import NegativeSampler


def wants_negative_sampler(config: ModelConfig) -> bool:
    return config.negatives.negative_sampling != "none" and config.negatives.num_negative_samples > 0


def wants_samplers(config: ModelConfig) -> bool:
    """Whether the config uses any statement sampler."""
    return wants_negative_sampler(config) or config.loss.label_loss_weight > 0


@dataclass
class Samplers:
    negative: NegativeSampler | None = None
    label: UserLabelSampler | None = None
    anchor: AnchorSampler | None = None

    def _named(self) -> dict[str, NegativeSampler | UserLabelSampler | AnchorSampler | None]:
        return {"negative_sampler": self.negative, "label_sampler": self.label, "anchor_sampler": self.anchor}

    def state_dict(self) -> dict[str, dict | None]:
        return {name: sampler.state_dict() if sampler else None for name, sampler in self._named().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, sampler in self._named().items():
            if sampler and state.get(name):
                sampler.load_state_dict(state[name])


def build_samplers(config: ModelConfig, pool: StatementPool, seed: int) -> Samplers:
    """The samplers the config turns on, over the statement pool (the statement table)."""
    samplers = Samplers()
    negatives = config.negatives
    if wants_negative_sampler(config):
        samplers.negative = NegativeSampler(
            negatives.negative_sampling, negatives.num_negative_samples, pool,
            margin=negatives.semi_hard_margin, refresh_steps=negatives.negative_refresh_steps, seed=seed)
    if config.loss.label_loss_weight > 0:
        samplers.label = UserLabelSampler(config.loss.labels_per_user, pool, seed=seed + 7919)
    return samplers
