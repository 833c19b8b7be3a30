"""The pretrained path: what the untrained space knows about users, added where a statement is new to the model.

Training teaches the heads the statement families it has labels for; a statement far from all of them (a genre
no label names) is answered by wherever the heads happen to map it, which can rank users worse than the untrained
encoder. The pretrained path adds, for such statements only, the untrained space's ranking of users:

    score(u, x) = [ trained(u) . trained(x) + scale * gate(x) * (content(u) - mean) . e(x) ] / sqrt(1 + gate(x)^2)

- content(u): the user's pooled frozen chunk vectors (`UserTower.content`, the untrained baseline's user vector);
  `mean` is its average over training users, so the term ranks users without moving any statement's offset (how
  often the model thinks a statement is true stays the trained one).
- e(x): the frozen item backbone's unit vector of the statement; gate(x) = sigmoid((novelty(x) - threshold) /
  sharpness) with novelty(x) = 1 - the highest cosine between e(x) and the training statements (`bank`). Training
  statements and their rephrasings stay near 0 and keep the trained score; a new kind of statement gets the path.
- scale: `pretrained_path_weight` x (std of trained scores / std of centred pretrained scores) over training labels,
  so the weight is in units of the trained score's spread.

It stays one dot product: the user vector gains `scale * (content - mean)`, the statement vector `gate * e(x)`,
and the statement vector is renormalised (unit, as before; the user vector is no longer unit). Both backbones must
be frozen (their spaces are the pretrained ones). `fit_pretrained_path` fits it on a trained model folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "pretrained_path."


class UserPretrainedPath(nn.Module):
    """The user side: scale * (content - mean of training users' content)."""

    def __init__(self, mean: torch.Tensor, scale: float | torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.mean.numel()

    def forward(self, trained: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """(B, D) trained unit vectors, (B, H) unit content -> (B, D + H)."""
        extra = self.scale * (content.float() - self.mean)
        return torch.cat([trained, extra.to(trained.dtype)], dim=-1)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> UserPretrainedPath:
        return cls(state[PREFIX + "mean"], state[PREFIX + "scale"])


class StatementPretrainedPath(nn.Module):
    """The statement side: the gate of the statement's novelty against the training statements (`bank`)."""

    def __init__(self, bank: torch.Tensor, threshold: float | torch.Tensor, sharpness: float | torch.Tensor):
        super().__init__()
        # float16 on disk and in memory: 20,000 training statements of 384 floats are 15 MB
        self.register_buffer("bank", F.normalize(torch.as_tensor(bank).float(), dim=-1).half())
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(1))
        self.register_buffer("sharpness", torch.as_tensor(sharpness, dtype=torch.float32).reshape(1))

    @property
    def width(self) -> int:
        return self.bank.shape[1]

    def gate(self, pretrained: torch.Tensor) -> torch.Tensor:
        """(N, H) unit pretrained statement vectors -> (N,) gate in (0, 1): near 1 for statements far from every
        training statement."""
        nearest = torch.zeros(len(pretrained), device=pretrained.device)
        for start in range(0, len(pretrained), 256):  # (256, bank) cosines at a time
            part = pretrained[start : start + 256].float() @ self.bank.float().T
            nearest[start : start + 256] = part.max(dim=1).values
        return torch.sigmoid((1.0 - nearest - self.threshold) / self.sharpness)

    def forward(self, trained: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D) trained unit vectors, (N, H) backbone pooled vectors -> (N, D + H) unit vectors."""
        pretrained = F.normalize(pooled.float(), dim=-1)
        gate = self.gate(pretrained)[:, None]
        out = torch.cat([trained.float(), gate * pretrained], dim=-1) / torch.sqrt(1.0 + gate**2)
        return out.to(trained.dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> StatementPretrainedPath:
        return cls(state[PREFIX + "bank"], state[PREFIX + "threshold"], state[PREFIX + "sharpness"])


def has_pretrained_path(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(PREFIX) for key in state)


FIT_LABELS = 8192
"""Training labels sampled (seeded) to measure the two scores' spreads, and whose users give the mean content."""


def fit_pretrained_path(model_dir: str | Path, dataset: Any, weight: float, threshold: float, sharpness: float,
                        split: str = "train", seed: int = 0, cache_dir: str | None = None,
                        progress: bool = False) -> dict[str, float]:
    """Fit the pretrained path of a trained model folder on its training labels and save the folder again.

    The bank is every statement of the `split` labels; the mean content and the scale come from up to FIT_LABELS of
    those labels (their users). Returns what was fitted (for logs)."""
    from uue.data.readers import UUEDataset, load_dataset
    from uue.model.encode import ModelEmbedder
    from uue.model.uue_model import UUEModel

    dataset = dataset if isinstance(dataset, UUEDataset) else load_dataset(dataset)
    labels = [lab for lab in dataset.labels if lab.split == split]
    if not labels:
        raise ValueError(f"the pretrained path is fitted on '{split}' labels and the data has none")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UUEModel.from_pretrained(model_dir, map_location=device)
    if not (model.config.towers.freeze_user_backbone and model.config.towers.freeze_item_backbone):
        raise ValueError("the pretrained path needs frozen user and item backbones (their spaces are the pretrained "
                         "ones)")
    model.user_tower.pretrained_path = None  # a refit starts from the trained towers alone
    model.item_tower.pretrained_path = None
    embedder = ModelEmbedder(model, device, progress=progress, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    sample = [labels[i] for i in rng.permutation(len(labels))[:FIT_LABELS]]
    user_ids = sorted({lab.user_id for lab in sample})
    bank_ids = sorted({lab.statement_id for lab in labels})
    users = [dataset.users[u] for u in user_ids]
    trained_users = embedder.users(users)
    content = _contents(embedder, users)
    bank = _pretrained_statements(model, embedder, [dataset.statements[s] for s in bank_ids])
    trained_bank_ids = sorted({lab.statement_id for lab in sample})
    trained_statements = embedder.statements([dataset.statements[s] for s in trained_bank_ids])
    user_pos = {u: i for i, u in enumerate(user_ids)}
    bank_pos = {s: i for i, s in enumerate(bank_ids)}
    trained_pos = {s: i for i, s in enumerate(trained_bank_ids)}
    mean = content.mean(0)
    rows = np.array([user_pos[lab.user_id] for lab in sample])
    columns = [trained_pos[lab.statement_id] for lab in sample]
    trained_scores = (trained_users[rows] * trained_statements[columns]).sum(1)
    pretrained_scores = ((content[rows] - mean) * bank[[bank_pos[lab.statement_id] for lab in sample]]).sum(1)
    scale = weight * float(trained_scores.std()) / max(float(pretrained_scores.std()), 1e-12)
    model.user_tower.pretrained_path = UserPretrainedPath(torch.as_tensor(mean), scale)
    model.item_tower.pretrained_path = StatementPretrainedPath(torch.as_tensor(bank), threshold, sharpness)
    model.cpu().save_pretrained(model_dir)
    return {"scale": scale, "bank": len(bank_ids), "users": len(user_ids), "threshold": threshold,
            "sharpness": sharpness}


def _contents(embedder: Any, users: Sequence[Any]) -> np.ndarray:
    """Each user's `UserTower.content` (unit pooled frozen chunk vectors), from the embedder's chunk cache."""
    tower = embedder.user_encoder.tower
    out = []
    with torch.no_grad():
        for vectors in embedder.user_encoder.chunk_vectors(users):
            parameter = next(tower.parameters())
            chunks = torch.as_tensor(vectors)[None].to(parameter.device, parameter.dtype)
            mask = torch.ones(chunks.shape[:2], dtype=torch.bool, device=parameter.device)
            out.append(tower.content(chunks, mask).float()[0].cpu().numpy())
    return np.stack(out)


def _pretrained_statements(model: Any, embedder: Any, statements: Sequence[Any]) -> np.ndarray:
    """Unit vectors of the frozen item backbone (the item tower's pooled text, before any head)."""
    encoder = embedder.statement_encoder
    out = []
    with torch.no_grad():
        for start in range(0, len(statements), encoder.batch_size):
            batch = encoder.featurize(statements[start : start + encoder.batch_size]).to(encoder.device)
            out.append(F.normalize(model.item_tower.encoder.encode(batch.text).float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def fit_configured_path(config: Any, model_dir: str | Path, dataset: Any) -> dict[str, float] | None:
    """The path `config.model.pretrained_path` asks for, fitted on `dataset` (its train labels) into the trained
    model folder; None when the config has none. Called by both trainers once the final model is saved."""
    options = config.model.pretrained_path
    if options.pretrained_path_weight <= 0:
        return None
    require_raw_data(config, dataset)
    return fit_pretrained_path(model_dir, dataset, options.pretrained_path_weight, options.novelty_threshold,
                               options.novelty_sharpness, seed=config.training.seed,
                               cache_dir=config.model.caching.cache_dir)


def require_raw_data(config: Any, dataset: Any) -> None:
    """Refuse, before any training, a pretrained path without the raw data it is fitted on."""
    if config.model.pretrained_path.pretrained_path_weight > 0 and dataset is None:
        raise ValueError("model.pretrained_path_weight > 0 fits the path on the training statements and users of a "
                         f"data-contract folder; data.path={config.data.path} is preprocessed shards only: point "
                         "data.path at the folder they were made from")
