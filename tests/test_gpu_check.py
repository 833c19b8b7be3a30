"""bench/gpu_check.sh's CPU dry run: every part runs (tiny shapes, 2 steps), one table is printed and one JSON
written, with each Ray-step figure beside its peer and its per-phase times; a part out of time is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uue.train.profile import PHASES

REPO = Path(__file__).resolve().parent.parent


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT")}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), *args],
                          cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)


def test_the_dry_run_writes_one_json_and_one_table(tmp_path):
    run = _check(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    assert {name: part["status"] for name, part in result["parts"].items()} == {
        "towers": "ok", "ray-production": "ok", "ray-tiny": "ok", "index": "ok"}
    for part in result["parts"].values():
        assert Path(part["log"]).is_file() and part["seconds"] > 0

    table = result["table"]
    towers = {row["what"].split()[2]: row for row in table if row["part"] == "towers"}
    assert set(towers) == {"hf_padded_sdpa", "hf_compiled", "packed_compiled"}
    assert towers["hf_padded_sdpa"]["ratio"] == pytest.approx(1.0)
    peer = towers["hf_compiled"]["value"]
    steps = [row for row in table if row["part"].startswith("ray-")]
    assert sorted(row["what"].split()[2:4] for row in steps) == [
        ["production", "packed"], ["production", "padded"], ["tiny", "packed"], ["tiny", "padded"]]
    for row in steps:
        assert row["value"] > 0 and row["ratio"] == pytest.approx(row["value"] / peer)
        assert set(row["phases"]) == set(PHASES) and row["phases"]["user_tower"] > 0
        assert row["phases"]["backward"] > 0 and row["step_seconds"] > 0
    production = result["parts"]["ray-production"]["result"]["rows"]
    assert all(r["batch"].endswith("(MovieLens lengths)") for r in production)
    assert any(row["part"] == "index" and row["unit"] == "stmt/s" and row["value"] > 0 for row in table)
    assert "GPU check" in run.stdout and "Ray step production packed" in run.stdout


def test_a_part_out_of_time_is_reported_and_the_json_still_written(tmp_path):
    run = _check(tmp_path, "--parts", "ray-tiny", "--limits", "1")
    assert run.returncode == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["parts"]["ray-tiny"]["status"] == "timed out after 1 s" and result["table"] == []
    assert "timed out" in run.stdout
