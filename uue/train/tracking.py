"""Experiment tracking: the metrics a run logs to metrics.jsonl also go to TensorBoard and, when configured, MLflow.

Rank 0 tracks (one process, or the first Ray Train worker: Ray Train V2 takes no logger callbacks, so the
worker logs itself). TensorBoard event files go under output_dir/tensorboard through the standard
`torch.utils.tensorboard.SummaryWriter`. MLflow is optional: it is imported only when a tracking URI is
configured (training.mlflow_tracking_uri, or the MLFLOW_TRACKING_URI environment variable), and a configured
URI without mlflow installed is an error that says how to fix it, not a run that silently tracks nothing.

Metric names: names with a section keep it (lr/user_backbone, time/user_tower); the others go under train/
(train/loss, train/user_tokens_per_second, train/mfu, train/pack_fill).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from uue.config import ExperimentConfig

NOT_TRACKED = frozenset({"step"})
"""Metric keys that are the x axis, not a series."""
MLFLOW_PARAMS_PER_CALL = 100
"""MLflow's limit of parameters per logged batch."""


class TrackingError(RuntimeError):
    """Tracking is configured but cannot start (MLflow not installed)."""


def series(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a step under their tracked names (booleans and texts are not series)."""
    out = {}
    for key, value in metrics.items():
        if key in NOT_TRACKED or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key if "/" in key else f"train/{key}"] = float(value)
    return out


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars in TensorBoard event files (`tensorboard --logdir <output_dir>/tensorboard`)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (a dependency)

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a few scalars per logged step: readable while the run goes on

    def close(self) -> None:
        self.writer.close()


def import_mlflow(where: str) -> Any:
    """The mlflow module, or a TrackingError naming where tracking was configured and how to fix it."""
    try:
        import mlflow
    except ImportError as err:
        raise TrackingError(
            f"MLflow tracking is configured ({where}) but the mlflow package is not installed: "
            "pip install 'uue[mlflow]' (or mlflow), or remove the tracking URI") from err
    return mlflow


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: model.optim.learning_rate -> "2e-05"."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = str(value)
    return params


class MLflowSink:
    """Metrics (and the config as parameters) in an MLflow run: a new run, or the run already active in this
    process (a notebook's `with mlflow.start_run()`), which is then left open."""

    def __init__(self, uri: str, where: str, experiment: str, run_name: str, params: dict[str, str]):
        self.mlflow = import_mlflow(where)
        self.mlflow.set_tracking_uri(uri)
        self.owns_run = self.mlflow.active_run() is None
        if self.owns_run:
            self.mlflow.set_experiment(experiment)
            self.mlflow.start_run(run_name=run_name)
        items = list(params.items())
        for start in range(0, len(items), MLFLOW_PARAMS_PER_CALL):
            self.mlflow.log_params(dict(items[start : start + MLFLOW_PARAMS_PER_CALL]))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self.owns_run:
            self.mlflow.end_run()


def mlflow_uri(config: ExperimentConfig) -> tuple[str | None, str]:
    """(tracking URI, where it was configured): the config key first, then MLFLOW_TRACKING_URI."""
    if config.training.mlflow_tracking_uri:
        return config.training.mlflow_tracking_uri, "training.mlflow_tracking_uri"
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return (uri, "the MLFLOW_TRACKING_URI environment variable") if uri else (None, "")


class MetricTrackers:
    """Every sink of a run; `log` sends one step's metrics to each."""

    def __init__(self, sinks: list[MetricSink] | None = None):
        self.sinks = sinks or []

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.sinks:
            values = series(metrics)
            for sink in self.sinks:
                sink.log(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_trackers(config: ExperimentConfig, rank: int = 0) -> MetricTrackers:
    """The configured sinks on rank 0 (none on the other ranks): TensorBoard under output_dir/tensorboard when
    training.tensorboard, MLflow when a tracking URI is configured."""
    if rank != 0:
        return MetricTrackers()
    training = config.training
    sinks: list[MetricSink] = []
    uri, where = mlflow_uri(config)
    if uri:  # first: a missing mlflow fails before any file is written
        sinks.append(MLflowSink(uri, where, training.mlflow_experiment, Path(training.output_dir).name,
                                flat_params(config.model_dump(mode="json"))))
    if training.tensorboard:
        sinks.append(TensorBoardSink(Path(training.output_dir) / "tensorboard"))
    return MetricTrackers(sinks)
