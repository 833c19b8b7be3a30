"""Fitting the pretrained path (uue.model.pretrained_path) on a trained model folder: the training users' mean
content, the training statements' pretrained vectors (the gate's bank) and the scale, from the training labels.
Both trainers call `fit_configured_path` once the final model is saved; `fit_pretrained_path` fits any folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from uue.config import UserPooling
from uue.data.readers import UUEDataset, load_dataset
from uue.model.encode import ModelEmbedder
from uue.model.pretrained_path import StatementPretrainedPath, UserPretrainedPath, item_head_as_map
from uue.model.uue_model import UUEModel

FIT_LABELS = 8192
"""Training labels sampled (seeded) to measure the two scores' spreads, and whose users give the mean content."""
CONTENT_MAP_RIDGE = 1.0
"""The content map's ridge penalty in units of the mean eigenvalue of the trained user vectors' Gram matrix (so it
does not depend on how many users the fit sees); MovieLens-1M validation users scored alike at 0.5, 1 and 2."""


def fit_pretrained_path(model_dir: str | Path, dataset: Any, weight: float, threshold: float, sharpness: float,
                        offset_threshold: float, user_pooling: UserPooling = "mean", trained_share: float = 1.0,
                        predicted_content_weight: float = 0.0, fallback_threshold: float | None = None,
                        split: str = "train", seed: int = 0, cache_dir: str | None = None,
                        progress: bool = False) -> dict[str, float]:
    """Fit the pretrained path of a trained model folder on its training labels and save the folder again.

    The bank is every statement of the `split` labels; the mean content, the mean trained user vector and the scale
    come from up to FIT_LABELS of those labels (their users). `user_pooling`: how the user side pools the frozen
    chunk vectors (`UserPretrainedPath`: "mean" or "affinity"); `trained_share`: how much of its trained ranking a new
    statement keeps (`StatementPretrainedPath`); `predicted_content_weight`: the weight of the content the trained
    user vector predicts (`UserPretrainedPath.content_map`, 0: none); `fallback_threshold`: the user novelty (1 -
    cosine of the user's mean content to the training users' mean) at which a user is half blended to the untrained
    baseline (None: no fallback). Returns what was fitted (for logs), with the highest novelty of the training
    users it saw."""
    if user_pooling not in get_args(UserPooling):
        raise ValueError(f"user_pooling must be one of {get_args(UserPooling)}, got {user_pooling!r}")
    if not 0.0 <= trained_share <= 1.0:
        raise ValueError(f"trained_share is a share of the trained ranking, in [0, 1]; got {trained_share}")
    if not predicted_content_weight >= 0.0:
        raise ValueError(f"predicted_content_weight is a weight, >= 0; got {predicted_content_weight}")
    if fallback_threshold is not None and not 0.0 < fallback_threshold < 2.0:
        raise ValueError(f"fallback_threshold is a novelty (1 - a cosine), in (0, 2); got {fallback_threshold}")
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
    hidden, width = model.user_tower.encoder.hidden_size, model.user_tower.embedding_dim
    if user_pooling == "affinity" and model.item_tower.metadata is not None:
        raise ValueError("user_pooling 'affinity' reads chunks as statements, which have no item metadata here")
    chunk_map = item_head_as_map(model.item_tower.projection, hidden) if user_pooling == "affinity" else (None, None)
    # A provisional path (no centring, scale 1) makes each user vector [trained | content | 1]: one pass of the
    # tower over the users' cached chunk vectors gives both.
    chunk_vectors = embedder.user_encoder.chunk_vectors(users)
    metadata = [user.metadata for user in users]
    model.user_tower.pretrained_path = UserPretrainedPath(torch.zeros(hidden), 1.0, *chunk_map)
    both = embedder.user_encoder.encode_vectors(chunk_vectors, metadata)
    trained_users, content = both[:, :width], both[:, width : width + hidden]
    plain_content = content
    if user_pooling == "affinity":  # the fallback compares users' plain mean content: the same vectors, mean-pooled
        model.user_tower.pretrained_path = UserPretrainedPath(torch.zeros(hidden), 1.0)
        plain_content = embedder.user_encoder.encode_vectors(chunk_vectors, metadata)[:, width : width + hidden]
    model.user_tower.pretrained_path = None
    # The bank (the frozen item backbone's unit vectors) and the trained statements: one read of the backbone.
    bank_statements = [dataset.statements[s] for s in bank_ids]
    bank = embedder.statement_encoder.backbone_vectors(bank_statements)
    bank /= np.clip(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12, None)
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
    content_map = (predicted_content_weight * ridge_map(trained_users, content - mean)
                   if predicted_content_weight > 0 else None)
    plain_mean = plain_content.mean(0)
    fallback = {} if fallback_threshold is None else {
        "fallback_threshold": fallback_threshold, "fallback_sharpness": sharpness,
        "baseline_mean": None if user_pooling == "mean" else torch.as_tensor(plain_mean)}
    model.user_tower.pretrained_path = UserPretrainedPath(torch.as_tensor(mean), scale, *chunk_map,
                                                          content_map=content_map, **fallback)
    model.item_tower.pretrained_path = StatementPretrainedPath(torch.as_tensor(bank), torch.as_tensor(
        trained_users.mean(0)), threshold, offset_threshold, sharpness, trained_share, fallback=bool(fallback))
    model.cpu().save_pretrained(model_dir)
    return {"scale": scale, "bank": len(bank_ids), "users": len(user_ids), "threshold": threshold,
            "offset_threshold": offset_threshold, "sharpness": sharpness, "user_pooling": user_pooling,
            "trained_share": trained_share, "predicted_content_weight": predicted_content_weight,
            "fallback_threshold": fallback_threshold,
            "training_user_novelty_max": highest_user_novelty(plain_content, plain_mean)}


def highest_user_novelty(content: np.ndarray, mean: np.ndarray) -> float:
    """The highest novelty (1 - cosine to `mean`) among the unit rows of `content` (the users' plain mean content,
    which the fallback compares)."""
    return float((1.0 - content @ (mean / max(float(np.linalg.norm(mean)), 1e-12))).max())


def ridge_map(inputs: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """(N, D) inputs, (N, H) targets -> the (D, H) ridge regression map, penalty CONTENT_MAP_RIDGE x the mean
    eigenvalue of inputs' Gram matrix."""
    x, y = np.asarray(inputs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    gram = x.T @ x
    penalty = CONTENT_MAP_RIDGE * np.trace(gram) / len(gram)
    return torch.as_tensor(np.linalg.solve(gram + penalty * np.eye(len(gram)), x.T @ y), dtype=torch.float32)


def fit_configured_path(config: Any, model_dir: str | Path, dataset: Any) -> dict[str, float] | None:
    """The path `config.model.pretrained_path` asks for, fitted on `dataset` (its train labels) into the trained
    model folder; None when the config has none. Called by both trainers once the final model is saved."""
    options = config.model.pretrained_path
    if options.pretrained_path_weight <= 0:
        return None
    require_raw_data(config, dataset)
    return fit_pretrained_path(model_dir, dataset, options.pretrained_path_weight, options.novelty_threshold,
                               options.novelty_sharpness, options.offset_novelty_threshold, options.user_pooling,
                               options.novel_trained_share, options.predicted_content_weight,
                               options.user_fallback_threshold, seed=config.training.seed,
                               cache_dir=config.model.caching.cache_dir)


def require_raw_data(config: Any, dataset: Any) -> None:
    """Refuse, before any training, a pretrained path without the raw data it is fitted on."""
    if config.model.pretrained_path.pretrained_path_weight > 0 and dataset is None:
        raise ValueError("model.pretrained_path_weight > 0 fits the path on the training statements and users of a "
                         f"data-contract folder; data.path={config.data.path} is preprocessed shards only: point "
                         "data.path at the folder they were made from")
