"""`uue study leave-one-family-out` as a user runs it: one family held out, trained, scored beside the baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_study_holds_a_family_out_and_reports_it_beside_the_baseline(tmp_path):
    out = tmp_path / "lofo"
    command = [sys.executable, "-m", "uue.cli", "study", "leave-one-family-out", "--config",
               str(REPO / "configs" / "tiny.yaml"), "--variant", "100k", "--families", "age", "--out", str(out),
               "training.max_steps=2", "model.batch_size=4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "lofo.json").read_text())
    (row,) = summary["families"]
    metrics = json.loads((out / "age" / "eval-validation" / "metrics.json").read_text())
    assert row["family"] == "age" and row["auc"] == metrics["groups"]["zero-shot age"]["auc"]
    assert row["baseline_auc"] == metrics["baseline"]["groups"]["zero-shot age"]["auc"]
    assert row["statement_auc"] == metrics["groups"]["zero-shot age"]["mean_statement_auc"]
    assert "age" not in metrics["groups"]  # the family has no seen part left
    assert summary["mean_gain"] == row["auc"] - row["baseline_auc"]
    assert (out / "lofo.png").stat().st_size > 0 and "| age |" in (out / "lofo.md").read_text()
    # The config as read at the start, which every family trained on.
    assert (out / "config.yaml").read_text() == (REPO / "configs" / "tiny.yaml").read_text()
    # Run again: the family is read back, not trained again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0 and "already evaluated" in again.stdout
    assert json.loads((out / "lofo.json").read_text()) == summary
