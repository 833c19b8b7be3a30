"""Evaluate a saved model on a data-contract folder, next to the untrained-backbone baseline.

Which labels are scored: the `test` split (every label when the folder has no `split`). The F1
threshold and the Platt calibration are chosen on the `validation` labels, never on the scored ones;
a folder without validation labels picks them on a random half of the scored users and reports F1 and
calibration error on the other half only (metrics.json says so under `threshold.source`).

Subsets reported: `overall`, `groups.<group>` for each label group, and `seen` / `zero_shot` (groups
whose name starts with "zero-shot" are statements never trained on).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uue.config import ModelConfig
from uue.data.featurize import Featurizer
from uue.data.readers import UUEDataset, load_dataset
from uue.data.schema import Label, Statement, UserData
from uue.evaluation.analysis import embedding_statistics, user_similarity
from uue.evaluation.calibration import PlattCalibrator, expected_calibration_error
from uue.evaluation.metrics import (
    best_threshold,
    f1_at,
    mean_auc_within,
    paired_auc_difference,
    retrieval_metrics,
    roc_auc,
)
from uue.model.backbone import TextEncoder, load_backbone
from uue.model.encode import ModelEmbedder, StatementBatchEncoder, UserBatchEncoder, shared_cache
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel

ZERO_SHOT_PREFIX = "zero-shot"


# ------------------------------------------------------------------------------------------- embedders
def _baseline_towers(model: UUEModel, device: torch.device) -> tuple[UserTower, ItemTower, Featurizer]:
    """The untrained backbones of the model's presets as towers with mean pooling and identity heads (no
    metadata), on the model's lengths."""
    config = model.config
    user_backbone, user_tokenizer = load_backbone(config.towers.user_model_name, seed=0)
    item_backbone, item_tokenizer = load_backbone(config.towers.item_model_name, seed=1)
    user_encoder, item_encoder = TextEncoder(user_backbone), TextEncoder(item_backbone)
    untrained = ModelConfig(towers=config.towers.model_copy(update={"embedding_dim": item_encoder.hidden_size}),
                            pooling={"use_attention_pooling": False}, heads={"projection_init": "identity"})
    user_config = untrained.model_copy(update={"embedding_dim": user_encoder.hidden_size})
    featurizer = Featurizer(config, user_tokenizer, item_tokenizer)
    user_tower = UserTower(user_encoder, user_config).to(device).eval()
    return user_tower, ItemTower(item_encoder, untrained).to(device).eval(), featurizer


class BaselineEmbedder:
    """The untrained backbones with mean pooling: user = mean of chunk vectors, no heads, no training."""

    name = "baseline"

    def __init__(self, model: UUEModel, device: torch.device, batch_size: int = 32, progress: bool = True,
                 cache_dir: str | None = None):
        user_tower, item_tower, featurizer = _baseline_towers(model, device)
        micro_batch = model.config.towers.encode_micro_batch
        chunks = shared_cache(user_tower.encoder, featurizer.user_tokenizer, device, micro_batch, cache_dir,
                              "baseline chunk vectors" if progress else None)
        statements = shared_cache(item_tower.encoder, featurizer.item_tokenizer, device, micro_batch, cache_dir,
                                  "baseline statement vectors" if progress else None)
        self.user_encoder = UserBatchEncoder(user_tower, featurizer, device, batch_size, chunks)
        self.statement_encoder = StatementBatchEncoder(item_tower, device, batch_size, featurizer, statements)

    def users(self, users: Sequence[UserData]) -> np.ndarray:
        means = np.stack([vectors.mean(0) for vectors in self.user_encoder.chunk_vectors(users)])
        return means / np.clip(np.linalg.norm(means, axis=1, keepdims=True), 1e-12, None)

    def statements(self, statements: Sequence[Statement]) -> np.ndarray:
        return self.statement_encoder.encode(statements)


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class ScoredLabels:
    """Labels as arrays with one score each."""

    users: np.ndarray  # user ids (str)
    statements: np.ndarray  # statement ids (str)
    labels: np.ndarray  # 0/1
    groups: np.ndarray  # group names ("" when none)
    scores: np.ndarray

    def subset(self, mask: np.ndarray) -> ScoredLabels:
        return ScoredLabels(self.users[mask], self.statements[mask], self.labels[mask], self.groups[mask],
                            self.scores[mask])

    def __len__(self) -> int:
        return len(self.labels)


def _score(labels: Sequence[Label], user_pos: dict[str, int], statement_pos: dict[str, int],
           user_vectors: np.ndarray, statement_vectors: np.ndarray) -> ScoredLabels:
    u = np.array([user_pos[lab.user_id] for lab in labels], dtype=np.int64)
    s = np.array([statement_pos[lab.statement_id] for lab in labels], dtype=np.int64)
    scores = (user_vectors[u] * statement_vectors[s]).sum(1) if len(labels) else np.zeros(0)
    return ScoredLabels(
        np.array([lab.user_id for lab in labels], dtype=object),
        np.array([lab.statement_id for lab in labels], dtype=object),
        np.array([lab.label for lab in labels], dtype=np.int64),
        np.array([lab.group or "" for lab in labels], dtype=object),
        scores.astype(np.float64),
    )


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _clean(obj: Any) -> Any:
    """NaN/inf -> null so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def subset_metrics(scored: ScoredLabels, threshold_labels: ScoredLabels, fallback_threshold: float,
                   calibrator: PlattCalibrator | None, user_pos: dict[str, int], statement_pos: dict[str, int],
                   user_vectors: np.ndarray, statement_vectors: np.ndarray, k: int) -> dict[str, Any]:
    """All label and retrieval metrics of one subset of scored labels."""
    out: dict[str, Any] = {"labels": len(scored), "positives": int(scored.labels.sum()),
                           "users": int(len(set(scored.users)))}
    out["auc"] = roc_auc(scored.scores, scored.labels)
    out["mean_user_auc"], out["users_with_both_classes"] = mean_auc_within(scored.scores, scored.labels, scored.users)
    out["mean_statement_auc"], out["statements_with_both_classes"] = mean_auc_within(
        scored.scores, scored.labels, scored.statements)
    if len(threshold_labels) and 0 < threshold_labels.labels.sum() < len(threshold_labels):
        threshold, source = best_threshold(threshold_labels.scores, threshold_labels.labels), "own"
    else:
        threshold, source = fallback_threshold, "overall"
    f1 = f1_at(scored.scores, scored.labels, threshold)
    out.update({"f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"], "threshold": threshold,
                "threshold_from": source})
    if calibrator is not None:
        out["ece"] = expected_calibration_error(calibrator.predict(scored.scores), scored.labels)
    # Retrieval: rank this subset's statement pool for every user with a true statement in it.
    pool = sorted(set(scored.statements))
    users = sorted(set(scored.users))
    if pool and users:
        matrix = user_vectors[[user_pos[u] for u in users]] @ statement_vectors[[statement_pos[s] for s in pool]].T
        relevant = np.zeros(matrix.shape, dtype=bool)
        row = {u: i for i, u in enumerate(users)}
        col = {s: i for i, s in enumerate(pool)}
        for u, s, y in zip(scored.users, scored.statements, scored.labels, strict=True):
            if y == 1:
                relevant[row[u], col[s]] = True
        retrieval = retrieval_metrics(matrix, relevant, k)
        out.update({key: value for key, value in retrieval.items() if key not in ("users", "pool_size")})
        out["retrieval_users"], out["pool_size"] = retrieval["users"], retrieval["pool_size"]
    return out


def _subsets(scored: ScoredLabels) -> dict[str, np.ndarray]:
    zero = np.array([g.startswith(ZERO_SHOT_PREFIX) for g in scored.groups], dtype=bool)
    subsets = {"overall": np.ones(len(scored), dtype=bool), "seen": ~zero, "zero_shot": zero}
    for group in sorted(set(scored.groups)):
        subsets[f"groups.{group or '(none)'}"] = scored.groups == group
    return subsets


def auc_versus_baseline(model: ScoredLabels, baseline: ScoredLabels, resamples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Per subset (`overall`, `seen`, `zero_shot`, `groups.<group>`): the model's pooled AUC minus the baseline's on
    the same labels, with a 95% interval from resampling users (`paired_auc_difference`). A group of a few
    hundred labels moves by several hundredths between user samples; this says whether a gap is more than that."""
    if not (np.array_equal(model.users, baseline.users) and np.array_equal(model.statements, baseline.statements)):
        raise ValueError("the model's and the baseline's scores must be on the same labels in the same order")
    out: dict[str, Any] = {"groups": {}}
    for name, mask in _subsets(model).items():
        if not mask.any():
            continue
        ours, theirs = model.subset(mask), baseline.subset(mask)
        difference = paired_auc_difference(ours.scores, theirs.scores, ours.labels, ours.users, resamples, seed=seed)
        if name.startswith("groups."):
            out["groups"][name.removeprefix("groups.")] = difference
        else:
            out[name] = difference
    return out


def evaluate_embedder(embedder: Any, dataset: UUEDataset, scored_labels: list[Label], threshold_labels: list[Label],
                      k: int, calibrator: PlattCalibrator | None = None, fit_calibration: bool = True,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, arrays for plots) of one embedder."""
    user_ids = sorted({lab.user_id for lab in scored_labels} | {lab.user_id for lab in threshold_labels})
    statement_ids = sorted({lab.statement_id for lab in scored_labels} | {lab.statement_id for lab in threshold_labels})
    user_vectors = embedder.users([dataset.users[u] for u in user_ids])
    statement_vectors = embedder.statements([dataset.statements[s] for s in statement_ids])
    user_pos = {u: i for i, u in enumerate(user_ids)}
    statement_pos = {s: i for i, s in enumerate(statement_ids)}
    scored = _score(scored_labels, user_pos, statement_pos, user_vectors, statement_vectors)
    tuning = _score(threshold_labels, user_pos, statement_pos, user_vectors, statement_vectors)
    calibration_source = "model folder (calibration.json)" if calibrator is not None else None
    if calibrator is None and fit_calibration and len(tuning) and 0 < tuning.labels.sum() < len(tuning):
        calibrator = PlattCalibrator.fit(tuning.scores, tuning.labels)
        calibration_source = "fitted on the threshold labels"
    overall_threshold = best_threshold(tuning.scores, tuning.labels) if len(tuning) else 0.0
    metrics: dict[str, Any] = {"groups": {}}
    tuning_subsets = _subsets(tuning)
    for name, mask in _subsets(scored).items():
        if not mask.any():
            continue
        tune_mask = tuning_subsets.get(name, np.zeros(len(tuning), dtype=bool))
        result = subset_metrics(scored.subset(mask), tuning.subset(tune_mask), overall_threshold, calibrator,
                                user_pos, statement_pos, user_vectors, statement_vectors, k)
        if name.startswith("groups."):
            metrics["groups"][name.removeprefix("groups.")] = result
        else:
            metrics[name] = result
    # Pooled AUC over several statement families also rewards knowing which family is mostly true (e.g.
    # held-out films are 3/4 positive, occupations 1/20); the macro AUC averages within-group AUCs instead.
    for name in ("overall", "seen", "zero_shot"):
        if name in metrics:
            zero = name == "zero_shot"
            aucs = [v["auc"] for g, v in metrics["groups"].items()
                    if (name == "overall" or g.startswith(ZERO_SHOT_PREFIX) == zero) and math.isfinite(v["auc"])]
            metrics[name]["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    if calibrator is not None:
        metrics["ece"] = expected_calibration_error(calibrator.predict(scored.scores), scored.labels)
        metrics["calibration"] = {"slope": calibrator.slope, "intercept": calibrator.intercept,
                                  "source": calibration_source}
    scored_users = sorted(set(scored.users))
    scored_user_vectors = user_vectors[[user_pos[u] for u in scored_users]]
    true_sets: dict[str, set[str]] = {u: set() for u in scored_users}
    for u, s, y in zip(scored.users, scored.statements, scored.labels, strict=True):
        if y == 1:
            true_sets[u].add(s)
    metrics["user_similarity"] = user_similarity(scored_user_vectors, [true_sets[u] for u in scored_users])
    positives = scored.labels == 1
    pool = sorted(set(scored.statements))
    metrics["embedding_statistics"] = embedding_statistics(
        user_vectors, statement_vectors[[statement_pos[s] for s in pool]],
        np.array([user_pos[u] for u in scored.users[positives]], dtype=np.int64),
        np.array([pool.index(s) for s in scored.statements[positives]], dtype=np.int64),
    )
    arrays = {"scored": scored, "user_ids": scored_users, "user_vectors": scored_user_vectors,
              "true_sets": true_sets, "calibrator": calibrator}
    return metrics, arrays


def _threshold_labels(dataset: UUEDataset, split: str | None, validation_split: str,
                      seed: int) -> tuple[list[Label], list[Label], dict[str, Any]]:
    """(labels to score, labels that choose threshold and calibration, how they were chosen)."""
    if dataset.has_splits:
        if split is None:
            raise ValueError("split=None with a folder that has splits: name the split to score (e.g. 'test')")
        scored = dataset.labels_in(split)
        if not scored:
            raise ValueError(f"{dataset.source}: no labels with split {split!r} to score")
        tuning = [lab for lab in dataset.labels if lab.split == validation_split]
        if tuning:
            return scored, tuning, {"source": f"'{validation_split}' labels", "labels": len(tuning)}
    else:
        scored = list(dataset.labels)
        if not scored:
            raise ValueError(f"{dataset.source}: no labels to score")
    users = sorted({lab.user_id for lab in scored})
    rng = np.random.default_rng(seed)
    tuning_users = set(rng.permutation(users)[: len(users) // 2].tolist())
    tuning = [lab for lab in scored if lab.user_id in tuning_users]
    scored = [lab for lab in scored if lab.user_id not in tuning_users]
    info = {"source": f"no validation labels: a random half of the users (seed {seed}) chose the threshold and "
                      "calibration; every metric is reported on the other half",
            "labels": len(tuning), "users": len(tuning_users)}
    return scored, tuning, info


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """`evaluate_model`'s options as flags (--data --out --split --k --no-baseline), one definition for `uue
    evaluate` and the `ray_jobs.evaluate` job; each adds its own model flag."""
    parser.add_argument("--data", required=True, help="data-contract folder (local path or URI)")
    parser.add_argument("--out", required=True, help="folder for metrics.json, report.md and plots")
    parser.add_argument("--split", default="test", help="split to score (all labels when the data has none)")
    parser.add_argument("--k", type=int, default=10, help="cut-off of the retrieval metrics")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained-backbone baseline")


def evaluate_model(model_dir: str | Path, data_dir: str | Path | UUEDataset, out_dir: str | Path, *,
                   split: str | None = "test", validation_split: str = "validation", k: int = 10,
                   baseline: bool = True, seed: int = 0, device: str | None = None, batch_size: int = 32,
                   report: bool = True, progress: bool = True, cache_dir: str | None = None) -> dict[str, Any]:
    """Score `split` labels of `data_dir` with the model in `model_dir`; write OUT/metrics.json (+ report).

    `cache_dir` keeps frozen backbones' chunk vectors between runs (uue.model.cache; UUE_CHUNK_CACHE_DIR wins).

    Returns the metrics dict: the model's metrics at the top level (`overall`, `groups`, `seen`,
    `zero_shot`, `ece`, `user_similarity`, `embedding_statistics`), the same under `baseline`, and under
    `auc_versus_baseline` the AUC gap to the baseline per subset with a 95% interval (users resampled).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = data_dir if isinstance(data_dir, UUEDataset) else load_dataset(data_dir)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = UUEModel.from_pretrained(model_dir, map_location=torch_device)
    scored_labels, tuning_labels, threshold_info = _threshold_labels(dataset, split, validation_split, seed)
    saved_calibration = PlattCalibrator.load(model_dir)
    embedder = ModelEmbedder(model, torch_device, batch_size, progress, cache_dir=cache_dir)
    metrics, arrays = evaluate_embedder(embedder, dataset, scored_labels, tuning_labels, k, saved_calibration)
    result: dict[str, Any] = {
        "model_dir": str(model_dir), "data": dataset.source, "split": split if dataset.has_splits else None,
        "k": k, "threshold": threshold_info, **metrics,
    }
    plot_arrays = {"model": arrays}
    if baseline:
        base = BaselineEmbedder(model, torch_device, batch_size, progress, cache_dir)
        base_metrics, base_arrays = evaluate_embedder(base, dataset, scored_labels, tuning_labels, k)
        result["baseline"] = {"description": "untrained backbones, mean pooling over chunk vectors, no heads",
                              **base_metrics}
        plot_arrays["baseline"] = base_arrays
        result["auc_versus_baseline"] = auc_versus_baseline(arrays["scored"], base_arrays["scored"], seed=seed)
    result = _clean(result)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if report:
        from uue.evaluation.report import write_report

        write_report(out_dir, result, plot_arrays)
    return result
