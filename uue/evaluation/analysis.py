"""What the embedding spaces look like: user similarity vs shared truths, alignment, uniformity, rank.

- alignment (Wang & Isola 2020): mean squared distance between a user and a statement true of them
  (lower: true pairs sit closer); uniformity: log of the mean Gaussian potential exp(-2 |x - y|^2) over
  distinct pairs (lower: vectors spread over the sphere). Both assume unit vectors.
- effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values, i.e. how
  many directions the vectors really use.
- user similarity: do users with overlapping true statements sit closer? Spearman correlation between
  the Jaccard overlap of two users' true statements and the cosine of their vectors, over all pairs.
"""

from __future__ import annotations

import numpy as np

from uue.evaluation.metrics import _average_ranks


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def alignment(users: np.ndarray, statements: np.ndarray) -> float:
    """Mean |u - s|^2 over rows (each row one true pair)."""
    if len(users) == 0:
        return float("nan")
    return float((np.linalg.norm(_unit(users) - _unit(statements), axis=1) ** 2).mean())


def uniformity(vectors: np.ndarray, t: float = 2.0) -> float:
    x = _unit(vectors)
    n = len(x)
    if n < 2:
        return float("nan")
    sq = np.clip(2.0 - 2.0 * (x @ x.T), 0.0, None)
    upper = sq[np.triu_indices(n, k=1)]
    return float(np.log(np.exp(-t * upper).mean()))


def effective_rank(vectors: np.ndarray) -> float:
    x = np.asarray(vectors, dtype=np.float64)
    if len(x) == 0:
        return float("nan")
    singular = np.linalg.svd(x, compute_uv=False)
    p = singular / max(singular.sum(), 1e-12)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def user_similarity(user_vectors: np.ndarray, true_sets: list[set[str]]) -> dict[str, float]:
    """Cosine of user pairs against the Jaccard overlap of their true statements."""
    x = _unit(user_vectors)
    n = len(x)
    result = {"pairs": 0, "spearman_overlap_vs_cosine": float("nan"),
              "mean_cosine_top_quartile_overlap": float("nan"), "mean_cosine_bottom_quartile_overlap": float("nan")}
    if n < 3:
        return result
    rows, cols = np.triu_indices(n, k=1)
    cosine = (x @ x.T)[rows, cols]
    overlap = np.array([
        len(true_sets[i] & true_sets[j]) / max(1, len(true_sets[i] | true_sets[j]))
        for i, j in zip(rows, cols, strict=True)
    ])
    high, low = np.quantile(overlap, 0.75), np.quantile(overlap, 0.25)
    result.update({
        "pairs": int(len(rows)),
        "spearman_overlap_vs_cosine": spearman(overlap, cosine),
        "mean_cosine_top_quartile_overlap": float(cosine[overlap >= high].mean()),
        "mean_cosine_bottom_quartile_overlap": float(cosine[overlap <= low].mean()),
    })
    return result


def embedding_statistics(user_vectors: np.ndarray, statement_vectors: np.ndarray,
                         positive_users: np.ndarray, positive_statements: np.ndarray) -> dict[str, float]:
    """Alignment over true pairs (given as row indices), uniformity and effective rank of each space."""
    return {
        "alignment": alignment(user_vectors[positive_users], statement_vectors[positive_statements]),
        "uniformity_users": uniformity(user_vectors),
        "uniformity_statements": uniformity(statement_vectors),
        "effective_rank_users": effective_rank(user_vectors),
        "effective_rank_statements": effective_rank(statement_vectors),
        "dim": int(user_vectors.shape[1]) if user_vectors.ndim == 2 else 0,
    }
