"""The demo's five steps, end to end on the tiny preset and the sample data (the MovieLens run is `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

from uue.cli.demo import run_demo

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_all_five_steps_and_prints_trained_vs_baseline(sample_data_dir, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime for p in Path(sample_data_dir).iterdir()}
    metrics = run_demo(str(REPO_ROOT / "configs" / "tiny.yaml"), [
        f"data.path={sample_data_dir}", f"training.output_dir={tmp_path}", "training.max_steps=4",
        "training.progress_bar=false",
    ])
    out = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    assert "not MovieLens" in out  # the sample data is used as it is, never overwritten
    assert {p.name: p.stat().st_mtime for p in Path(sample_data_dir).iterdir()} == before
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == metrics
    overall = next(line for line in out.splitlines() if line.strip().startswith("overall"))
    assert f"{metrics['overall']['auc']:.3f}" in overall and f"{metrics['baseline']['overall']['auc']:.3f}" in overall
    assert f"{metrics['overall']['ndcg@10']:.3f}" in overall
    assert (tmp_path / "model" / "calibration.json").is_file()
    assert (tmp_path / "eval" / "report.md").is_file()
