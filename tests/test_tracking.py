"""Experiment tracking: TensorBoard event files hold what metrics.jsonl holds; MLflow logs the same when a tracking
URI is configured (key or environment), and a configured URI without mlflow installed is a clear error."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from uue.config import ExperimentConfig, TrainingConfig
from uue.train import UUETrainer
from uue.train.tracking import TrackingError, open_trackers, series


def _config(model_config, data_dir, out, **training) -> ExperimentConfig:
    return ExperimentConfig(model=model_config, data={"path": str(data_dir)},
                            training=TrainingConfig(output_dir=str(out), progress_bar=False, **training))


def test_series_names_keep_sections_and_drop_what_is_not_a_number():
    assert series({"loss": 1.5, "lr/head": 1e-3, "time/user_tower": 0.2, "step": 3, "epoch": 0,
                   "flag": True, "name": "x", "mfu": float("nan")}) == {
        "train/loss": 1.5, "lr/head": 1e-3, "time/user_tower": 0.2, "train/epoch": 0.0}


def test_tensorboard_event_files_hold_the_logged_metrics(tiny_model_config, sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    packed = tiny_model_config.model_copy(update={"attention": "packed", "pack_tokens": 128})  # logs pack_fill
    out = tmp_path / "run"
    UUETrainer(_config(packed, sample_data_dir, out, max_steps=4, log_every_steps=2)).fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr/user_backbone", "lr/head", "train/user_tokens_per_second", "train/pack_fill",
            "time/user_tower", "time/item_tower", "time/loss", "time/optimizer", "time/data"} <= tags
    for tag, key in (("train/loss", "loss"), ("train/pack_fill", "pack_fill"), ("time/backward", "time/backward")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [2, 4]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in logged], rel=1e-6)


def test_no_tensorboard_when_turned_off_and_no_sinks_off_rank_zero(tiny_model_config, sample_data_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tiny_model_config, sample_data_dir, tmp_path / "off", max_steps=1, tensorboard=False)
    UUETrainer(config).fit()
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and not (tmp_path / "off" / "tensorboard").exists()
    on = _config(tiny_model_config, sample_data_dir, tmp_path / "rank1", mlflow_tracking_uri="file:///nowhere")
    assert open_trackers(on, rank=1).sinks == []  # rank 1 never imports mlflow or writes event files


class FakeMlflow(types.ModuleType):
    """Records the mlflow calls the tracker makes."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls: list[tuple] = []
        self.metrics: list[tuple[int, dict]] = []
        self.params: dict[str, str] = {}
        self.active = None

    def set_tracking_uri(self, uri):
        self.calls.append(("set_tracking_uri", uri))

    def active_run(self):
        return self.active

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_name=None):
        self.calls.append(("start_run", run_name))

    def log_params(self, params):
        assert len(params) <= 100  # MLflow's batch limit
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def end_run(self):
        self.calls.append(("end_run",))


def test_mlflow_gets_the_config_and_the_logged_metrics(tiny_model_config, sample_data_dir, tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "tracked"
    config = _config(tiny_model_config, sample_data_dir, out, max_steps=2, log_every_steps=1, tensorboard=False,
                     mlflow_tracking_uri="http://127.0.0.1:5000", mlflow_experiment="uue-test")
    UUETrainer(config).fit()
    assert fake.calls == [("set_tracking_uri", "http://127.0.0.1:5000"), ("set_experiment", "uue-test"),
                          ("start_run", "tracked"), ("end_run",)]
    assert fake.params["model.optim.batch_size"] == "8" and fake.params["training.max_steps"] == "2"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in fake.metrics] == [1, 2]
    for (_, metrics), line in zip(fake.metrics, logged, strict=True):
        assert metrics["train/loss"] == line["loss"] and metrics["time/user_tower"] == line["time/user_tower"]

    # The environment variable configures it too; a run already active (a notebook's) is logged into, not ended.
    fake.calls.clear()
    fake.active = object()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    open_trackers(_config(tiny_model_config, sample_data_dir, out, tensorboard=False)).close()
    assert fake.calls == [("set_tracking_uri", "http://127.0.0.1:5001")]


def test_a_configured_uri_without_mlflow_installed_is_a_clear_error(tiny_model_config, sample_data_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "missing"
    trainer = UUETrainer(_config(tiny_model_config, sample_data_dir, out, max_steps=1,
                                 mlflow_tracking_uri="http://127.0.0.1:5000"))
    with pytest.raises(TrackingError, match=r"training\.mlflow_tracking_uri.*pip install"):
        trainer.fit()
    assert not (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()  # nothing trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI environment variable"):
        open_trackers(_config(tiny_model_config, sample_data_dir, out))
