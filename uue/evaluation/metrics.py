"""Scoring metrics in plain numpy: ROC AUC, F1 at a threshold, and top-k retrieval metrics.

Definitions (what metrics.json reports):
- `auc`: ROC AUC over all scored labels pooled together (ties count one half), i.e. the probability
  that a random true (user, statement) pair scores above a random false one.
- `mean_user_auc`: the same within each user's labels, averaged over users that have both classes.
- `mean_statement_auc`: the same within each statement's labels (does it rank the users a statement fits above
  those it does not), averaged over statements with both classes. Unlike the pooled `auc` it ignores each
  statement's offset, i.e. whether the model knows how often the statement is true.
- `f1`: F1 of `score >= threshold`, the threshold chosen elsewhere (validation labels).
- retrieval at k, per user over a pool of statements, averaged over users with >= 1 true statement:
  `precision@k` = hits / k, `recall@k` = hits / true statements, `f1@k` = their harmonic mean (per
  user, then averaged), `ndcg@k` with binary gains, `mrr@k` = 1 / rank of the first hit (0 if none).
- `auc_versus_baseline`: the model's pooled AUC minus the baseline's on the same labels, with a 95% interval from
  resampling users with replacement (each draw scores both on the same users, so what they share cancels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mann-Whitney form of ROC AUC; NaN when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def mean_auc_within(scores: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> tuple[float, int]:
    """(mean of the AUCs within each key's labels, number of keys whose labels have both classes); keys are the
    labels' users (`mean_user_auc`) or statements (`mean_statement_auc`)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    _, inverse = np.unique(np.asarray(keys), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    aucs = []
    for rows in np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1):
        auc = roc_auc(scores[rows], labels[rows])
        if not math.isnan(auc):
            aucs.append(auc)
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = np.asarray(scores) >= threshold
    labels = np.asarray(labels).astype(bool)
    tp = float((predicted & labels).sum())
    precision = tp / predicted.sum() if predicted.any() else 0.0
    recall = tp / labels.sum() if labels.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 on these labels (used on validation labels only)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if not labels.any():
        return float(scores.max()) + 1e-6 if scores.size else 0.0
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    f1 = 2 * tp / (predicted + y.sum())
    return float(s[last_of_tie[int(np.argmax(f1))]])


def _tie_groups(scores: np.ndarray) -> np.ndarray:
    """Each score's index among the sorted distinct scores (tied scores share one)."""
    return np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)[1].reshape(-1)


def _weighted_auc(tie_group: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """ROC AUC with a weight per label (a label drawn k times counts k times); ties count one half."""
    groups = int(tie_group.max()) + 1 if tie_group.size else 0
    positive = np.bincount(tie_group, weights * labels, minlength=groups)
    negative = np.bincount(tie_group, weights * (1 - labels), minlength=groups)
    total_pos, total_neg = positive.sum(), negative.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    below = np.cumsum(negative) - negative
    return float((positive * (below + 0.5 * negative)).sum() / (total_pos * total_neg))


def weighted_roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                     weights: Sequence[float] | np.ndarray) -> float:
    """ROC AUC where label i counts weights[i] times (NaN when a class has no weight); equal weights give
    `roc_auc`."""
    labels = np.asarray(labels).reshape(-1).astype(np.float64)
    return _weighted_auc(_tie_groups(scores), labels, np.asarray(weights, dtype=np.float64).reshape(-1))


def paired_auc_difference(scores: np.ndarray, reference_scores: np.ndarray, labels: np.ndarray,
                          clusters: np.ndarray, resamples: int = 1000, level: float = 0.95,
                          seed: int = 0) -> dict[str, float | int]:
    """AUC(scores) - AUC(reference_scores) on the same labels, with a percentile interval from resampling
    clusters (users) with replacement.

    Why users and not labels: one user's labels share a history and rise or fall together, so resampling
    labels would call a gain on a few hundred users surer than it is. Both scorers see the same draw.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.float64)
    if not len(scores) == len(reference_scores) == len(labels) == len(clusters):
        raise ValueError("scores, reference_scores, labels and clusters need one entry per label")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not (isinstance(resamples, int) and resamples >= 1):
        raise ValueError(f"resamples is how many user draws the interval takes, >= 1; got {resamples!r}")
    mine, theirs = _tie_groups(scores), _tie_groups(reference_scores)
    _, cluster = np.unique(np.asarray(clusters), return_inverse=True)
    cluster = cluster.reshape(-1)
    n_clusters = int(cluster.max()) + 1 if cluster.size else 0
    ones = np.ones(len(labels))
    difference = _weighted_auc(mine, labels, ones) - _weighted_auc(theirs, labels, ones)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        weights = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[cluster].astype(
            np.float64)
        draws[i] = _weighted_auc(mine, labels, weights) - _weighted_auc(theirs, labels, weights)
    draws = draws[np.isfinite(draws)]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(draws, [tail, 100 - tail]) if draws.size else (float("nan"), float("nan")))
    return {"difference": float(difference), "low": float(low), "high": float(high), "level": level,
            "resamples": int(draws.size), "users": n_clusters}


def retrieval_metrics(score_matrix: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict[str, float]:
    """Top-k metrics of ranking each row's pool (columns) by score, against a boolean relevance matrix.

    Rows without any relevant column are skipped (their count is `users` in the result).
    """
    score_matrix = np.asarray(score_matrix, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    rows = np.flatnonzero(relevant.any(1))
    out = {f"precision@{k}": float("nan"), f"recall@{k}": float("nan"), f"f1@{k}": float("nan"),
           f"ndcg@{k}": float("nan"), f"mrr@{k}": float("nan"), "users": int(len(rows)),
           "pool_size": int(score_matrix.shape[1])}
    if len(rows) == 0:
        return out
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    precision, recall, f1, ndcg, mrr = [], [], [], [], []
    for row in rows:
        # Stable order on -score: ties keep pool order, so results never depend on sort internals.
        top = np.argsort(-score_matrix[row], kind="mergesort")[:k]
        hits = relevant[row, top]
        n_rel = int(relevant[row].sum())
        p = hits.sum() / k
        r = hits.sum() / n_rel
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
        ideal = discounts[: min(n_rel, k)].sum()
        ndcg.append(float((hits * discounts[: len(hits)]).sum() / ideal))
        first = np.flatnonzero(hits)
        mrr.append(1.0 / (first[0] + 1) if first.size else 0.0)
    out.update({f"precision@{k}": float(np.mean(precision)), f"recall@{k}": float(np.mean(recall)),
                f"f1@{k}": float(np.mean(f1)), f"ndcg@{k}": float(np.mean(ndcg)), f"mrr@{k}": float(np.mean(mrr))})
    return out
