"""The demo's five steps, end to end with the demo's own config on the sample data (the MovieLens run is `make
demo`): frozen MiniLM towers whose untrained model is the baseline, so a few steps must beat it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from uue.cli.demo import run_demo


def test_demo_trains_past_its_baseline_and_reports_this_run(sample_data_dir, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime for p in Path(sample_data_dir).iterdir()}
    metrics = run_demo(None, [  # None: configs/movielens-minilm.yaml, what `make demo` trains
        f"data.path={sample_data_dir}", f"training.output_dir={tmp_path}", "training.max_steps=6",
        "training.progress_bar=false", "model.batch_size=8", "model.head_learning_rate=0.01",
        "model.num_negative_samples=4",  # the sample data's 16 statements: the config's 16 need a larger pool
    ])
    out = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    assert "not MovieLens" in out  # the sample data is used as it is, never overwritten
    assert {p.name: p.stat().st_mtime for p in Path(sample_data_dir).iterdir()} == before

    # Six steps on the heads move the model off the pretrained space it starts as, towards the labels
    # (measured: seen AUC about 0.98 against the baseline's 0.95 on the 8 test users).
    seen, baseline = metrics["seen"]["auc"], metrics["baseline"]["seen"]["auc"]
    assert seen > baseline + 0.01, (seen, baseline)
    assert f"seen, trained vs baseline: auc {seen:.3f} vs {baseline:.3f} (better)" in out

    # What the demo writes is this run's: the metrics it returned, its report's rows, its step count.
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"| seen | {metrics['seen']['labels']} | {seen:.3f} ({baseline:.3f}) |" in report
    assert json.loads((tmp_path / "eval" / "timing.json").read_text())["steps"] == 6
    overall = next(line for line in out.splitlines() if line.strip().startswith("overall"))
    assert f"{metrics['overall']['auc']:.3f}" in overall and f"{metrics['baseline']['overall']['auc']:.3f}" in overall
    gap = metrics["auc_versus_baseline"]["overall"]
    assert f"{gap['difference']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" in overall
    # Step 3's probabilities are this run's calibration (fitted on the validation users) of the printed scores.
    calibration = json.loads((tmp_path / "model" / "calibration.json").read_text())
    printed = re.findall(r"^\s+([+-]\d\.\d{3}) p=(\d\.\d\d) ", out, flags=re.M)
    assert len(printed) == 15  # five statements for each of three test users
    for score, probability in printed:
        z = calibration["slope"] * float(score) + calibration["intercept"]
        assert abs(1 / (1 + math.exp(-z)) - float(probability)) <= 0.006 + 0.0005 * abs(calibration["slope"])
