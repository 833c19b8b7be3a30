"""The statement samplers of one training process: sampled negatives and the label loss's draws.

Both draw from the statement table's features (the pool); which statements are a user's positives and
labels travels with each batch row, so a sampler holds no per-user state beyond its RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uue.config import ModelConfig
from uue.distill import AnchorSampler
from uue.label_loss import UserLabelSampler
from uue.negatives import NegativeSampler


def wants_negative_sampler(config: ModelConfig) -> bool:
    return config.negative_sampling != "none" and config.num_negative_samples > 0


def wants_samplers(config: ModelConfig) -> bool:
    """Whether the config uses any statement sampler (and so needs the statement pool's features)."""
    return wants_negative_sampler(config) or config.label_loss_weight > 0


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


def build_samplers(config: ModelConfig, pool_features: dict[str, np.ndarray], seed: int) -> Samplers:
    """The samplers the config turns on, over the statement pool (positions index `pool_features`)."""
    samplers = Samplers()
    if wants_negative_sampler(config):
        samplers.negative = NegativeSampler(
            config.negative_sampling, config.num_negative_samples, pool_features,
            margin=config.semi_hard_margin, refresh_steps=config.negative_refresh_steps, seed=seed)
    if config.label_loss_weight > 0:
        samplers.label = UserLabelSampler(config.labels_per_user, pool_features, seed=seed + 7919)
    return samplers
