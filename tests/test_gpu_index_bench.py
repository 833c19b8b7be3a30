"""bench/gpu_index.py runs on CPU (tiny preset) as a user runs it: padded and packed jobs vs the HF peer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_index_bench_dry_run(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    result_file = tmp_path / "gpu_index.json"
    run = subprocess.run([sys.executable, str(repo / "bench" / "gpu_index.py"), "--preset", "tiny", "--count", "500",
                          "--lengths", "mixed", "--workdir", str(tmp_path / "work"), "--result", str(result_file)],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["count"] == 500 and result["raw_stmt_per_s"] > 0
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"padded", "packed"}
    for row in rows.values():
        assert row["job_stmt_per_s"] > 0 and row["steady_stmt_per_s"] > 0 and row["build"]["attention"] == row[
            "attention"]
        assert row["recall_at_10"] >= 0.9
    agree = rows["packed"]["vectors_agree"]  # float32 on CPU: packed writes the padded job's vectors
    assert agree["vs"] == "padded" and agree["statements"] > 0
    assert agree["max_abs_diff"] <= 1e-5 and agree["min_cosine"] >= 0.9999
    assert "Ray Data job, packed" in run.stdout and "after start-up" in run.stdout
    assert not (tmp_path / "work" / "index-packed").exists()  # each variant's index is removed after measuring
