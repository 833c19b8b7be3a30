"""Where a step's time goes: every step logs per-phase times, and training.profile_steps writes a torch.profiler
trace of those steps (rank in the file name) that names the phases."""

from __future__ import annotations

import json
import time

import pytest
import torch

from uue.config import ExperimentConfig, TrainingConfig
from uue.train import UUETrainer
from uue.train.profile import PHASES, PhaseClock, phase


def _trainer(tiny_model_config, sample_data_dir, out, **training) -> UUETrainer:
    return UUETrainer(ExperimentConfig(
        model=tiny_model_config, data={"path": str(sample_data_dir)},
        training=TrainingConfig(output_dir=str(out), progress_bar=False, log_every_steps=1,
                                **training)))


def test_the_clock_times_marked_phases_only_while_measuring():
    clock = PhaseClock(torch.device("cpu"))
    with phase("user_tower"):  # nobody measures: a no-op
        time.sleep(0.01)
    assert clock.read() == {}
    with clock.measuring():
        with phase("user_tower"):
            time.sleep(0.05)
        with phase("loss"):
            pass
    clock.add("data", 0.5)
    with phase("user_tower"):  # measuring ended: these 0.5 s must not count
        time.sleep(0.5)
    seconds = clock.read()
    assert list(seconds) == ["time/data", "time/user_tower", "time/loss"]  # step order
    assert seconds["time/data"] == 0.5 and 0.05 <= seconds["time/user_tower"] < 0.5
    assert clock.read() == {}  # read resets


def test_profile_steps_must_be_an_ordered_pair_from_step_one():
    assert TrainingConfig(profile_steps=[2, 4]).profile_steps == (2, 4)
    for bad in ([0, 2], [3, 2]):
        with pytest.raises(ValueError, match="profile_steps"):
            TrainingConfig(profile_steps=bad)


def test_every_step_logs_its_phases_and_the_profiled_steps_leave_a_trace(tiny_model_config, sample_data_dir,
                                                                         tmp_path):
    out = tmp_path / "run"
    result = _trainer(tiny_model_config, sample_data_dir, out, max_steps=3, profile_steps=[2, 3]).fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3]
    for metrics in logged:
        phases = {name: metrics[f"time/{name}"] for name in PHASES}
        assert all(seconds >= 0 for seconds in phases.values())
        assert phases["user_tower"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
        inside = sum(seconds for name, seconds in phases.items() if name != "data")
        assert inside <= metrics["step_seconds"] + 1e-3  # the phases lie inside the step the loop timed
    assert result.history[-1]["time/loss"] == logged[-1]["time/loss"]

    traces = sorted((out / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0.steps2-3.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"uue.train_step#2", "uue.train_step#3"} <= names and "uue.train_step#1" not in names
    assert {f"uue.{p}" for p in PHASES if p != "data"} <= names  # the phases are ranges in the trace


def test_no_trace_without_profile_steps_and_a_short_run_still_writes_its_trace(tiny_model_config, sample_data_dir,
                                                                               tmp_path):
    _trainer(tiny_model_config, sample_data_dir, tmp_path / "plain", max_steps=1).fit()
    assert not (tmp_path / "plain" / "profile").exists()
    # The run ends (step 2) before the profiled range does (step 5): the steps it recorded are written.
    _trainer(tiny_model_config, sample_data_dir, tmp_path / "short", max_steps=2, profile_steps=[2, 5]).fit()
    trace = tmp_path / "short" / "profile" / "rank0.steps2-5.pt.trace.json"
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "uue.train_step#2" in names
