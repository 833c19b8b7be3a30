"""Turn similarity scores into probabilities: Platt scaling fitted on validation labels.

Stored as `calibration.json` beside a model (`{"method": "platt", "slope": a, "intercept": b}`), so
every consumer (CLI `uue score`, Serve `/score`) reads the same mapping p = sigmoid(a * score + b).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CALIBRATION_FILE = "calibration.json"


@dataclass
class PlattCalibrator:
    slope: float
    intercept: float
    method: str = "platt"
    fitted_on: int = 0  # number of labels it was fitted on

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, steps: int = 500) -> PlattCalibrator:
        """Maximum-likelihood logistic fit of labels on scores (full-batch LBFGS, a few ms)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        if scores.size == 0 or scores.size != labels.size:
            raise ValueError(f"calibration needs equally many scores and labels, got {scores.size} and {labels.size}")
        if len(np.unique(labels)) < 2:
            raise ValueError("calibration needs both positive and negative labels")
        x = torch.as_tensor(scores)
        y = torch.as_tensor(labels)
        params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
            loss = loss + 1e-6 * (params**2).sum()  # keeps separable data finite
            loss.backward()
            return loss

        optimizer.step(closure)
        slope, intercept = params.detach().tolist()
        return cls(slope=slope, intercept=intercept, fitted_on=int(scores.size))

    def predict(self, scores: np.ndarray | float) -> np.ndarray:
        z = self.slope * np.asarray(scores, dtype=np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> PlattCalibrator | None:
        """The calibration saved beside a model, or None when it was never calibrated."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("method") != "platt" or not all(math.isfinite(data[k]) for k in ("slope", "intercept")):
            raise ValueError(f"{path}: not a valid Platt calibration: {data}")
        return cls(**data)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE: the bin-weighted gap between mean predicted probability and observed frequency."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


def calibrate_model(model_dir: str | Path, dataset_or_data_dir, split: str = "validation",
                    progress: bool = False, cache_dir: str | None = None) -> PlattCalibrator | None:
    """Fit Platt scaling on the `split` labels of a dataset and save calibration.json into `model_dir`.

    Returns None (and writes nothing) when the data has no labels of that split, or only one class.
    `cache_dir`: where frozen backbones' chunk vectors are kept between runs (uue.model.cache).
    """
    from uue.data.readers import UUEDataset, load_dataset
    from uue.model.encode import ModelEmbedder
    from uue.model.uue_model import UUEModel

    dataset = dataset_or_data_dir if isinstance(dataset_or_data_dir, UUEDataset) else load_dataset(dataset_or_data_dir)
    labels = [lab for lab in dataset.labels if lab.split == split]
    if not labels or len({lab.label for lab in labels}) < 2:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UUEModel.from_pretrained(model_dir, map_location=device)
    embedder = ModelEmbedder(model, device, progress=progress, cache_dir=cache_dir)
    user_ids = sorted({lab.user_id for lab in labels})
    statement_ids = sorted({lab.statement_id for lab in labels})
    users = embedder.users([dataset.users[u] for u in user_ids])
    statements = embedder.statements([dataset.statements[s] for s in statement_ids])
    user_pos = {u: i for i, u in enumerate(user_ids)}
    statement_pos = {s: i for i, s in enumerate(statement_ids)}
    scores = np.array([users[user_pos[lab.user_id]] @ statements[statement_pos[lab.statement_id]] for lab in labels])
    calibrator = PlattCalibrator.fit(scores, np.array([lab.label for lab in labels]))
    calibrator.save(model_dir)
    return calibrator
