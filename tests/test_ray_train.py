"""Ray Train + DeepSpeed: config building, the data plan, N-vs-1 worker equivalence, fault tolerance,
ZeRO-3 export, a two-node cluster, the job entry point and the GPU bench's CPU mode.

Each Ray Train fit costs ~30 s on 2 idle cores, so the fits are few: equivalence 2, fault tolerance 1
(with a restart), ZeRO-3 export 1, multi-node 1 (own process), bench 1 (own process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from uue.config import load_config
from uue.data.readers import load_dataset
from uue.model.uue_model import UUEModel, load_tower
from uue.ray_train import TrainingPlan, TrainProbe, deepspeed_config, run_training

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "configs" / "tiny.yaml"


def _config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"training.output_dir={tmp_path / 'run'}", "model.negative_sampling=none",
                              "model.num_negative_samples=0", *overrides])


def _batch_log(folder: Path) -> dict[int, list[dict]]:
    return {int(p.stem.split("_")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("rank_*.jsonl"))}


# ---------------------------------------------------------------------------------- no Ray needed
def test_deepspeed_config_follows_the_experiment_config(tmp_path):
    config = _config(tmp_path, "distributed.zero_stage=3", "model.batch_size=4", "model.max_grad_norm=0.5")
    ds = deepspeed_config(config, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    assert deepspeed_config(_config(tmp_path, "distributed.use_gpu=true"), 1)["bf16"]["enabled"] is True

    # A custom file is the base; the experiment config still decides stage, batch and clipping.
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 1, "stage3_param_persistence_threshold": 0},
                                  "gradient_clipping": 9.0}))
    ds = deepspeed_config(_config(tmp_path, f"distributed.deepspeed_config={custom}", "distributed.zero_stage=3"), 1)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["gradient_clipping"] == 1.0
    with pytest.raises(FileNotFoundError, match="nope.json"):
        deepspeed_config(_config(tmp_path, "distributed.deepspeed_config=nope.json"), 1)


def test_plan_covers_each_training_pair_once_per_epoch(tmp_path, sample_data_dir):
    dataset = load_dataset(sample_data_dir)
    config = _config(tmp_path, "training.max_steps=null", "model.num_epochs=2", "model.batch_size=8",
                     "distributed.num_workers=2")
    plan = TrainingPlan.build(dataset, config)
    pairs = Counter((plan.user_ids[u], plan.statement_ids[s])
                    for u, s in [(r["user_index"], r["statement_index"]) for r in plan.rows if r["epoch"] == 0])
    expected = Counter(dataset.positive_pairs("train"))
    assert plan.steps_per_epoch == len(expected) // 16 and plan.total_steps == 2 * plan.steps_per_epoch
    assert pairs == expected  # 128 pairs = 8 global batches of 16: nothing dropped, nothing twice
    steps = Counter(r["step"] for r in plan.rows)
    assert set(steps.values()) == {16} and sorted(steps) == list(range(1, plan.total_steps + 1))
    # Epochs are shuffled differently, and the plan is the same every time it is built (resumable).
    first = [(r["user_index"], r["statement_index"]) for r in plan.rows if r["epoch"] == 0]
    second = [(r["user_index"], r["statement_index"]) for r in plan.rows if r["epoch"] == 1]
    assert first != second and sorted(first) == sorted(second)
    assert TrainingPlan.build(dataset, config).rows == plan.rows
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainingPlan.build(dataset, _config(tmp_path, "model.batch_size=100", "distributed.num_workers=2"))


def test_train_job_rejects_a_bad_config_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--config", str(TINY), "distributed.zero_stage=4"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "distributed.zero_stage" in proc.stderr


# ---------------------------------------------------------------------------------- Ray Train fits
def test_two_workers_match_one_worker_with_twice_the_batch(ray_session, tmp_path):
    """2 workers x batch 4 == 1 worker x batch 8 on the first step: loss and every gradient (ZeRO-2, CPU)."""
    runs = {}
    for workers, batch in ((2, 4), (1, 8)):
        out = tmp_path / f"w{workers}"
        config = _config(out, "training.max_steps=1", f"model.batch_size={batch}", "model.dropout=0.0",
                         f"distributed.num_workers={workers}", "distributed.zero_stage=2")
        probe = TrainProbe(batch_log_dir=str(out / "batches"), gradient_dump_step=1, gradient_dump_dir=str(out))
        run_training(config, probe=probe)
        runs[workers] = (_batch_log(out / "batches"), torch.load(out / "step_1.pt"))

    (two_log, two_grads), (one_log, one_grads) = runs[2], runs[1]
    # The union of the two workers' first batches, in rank order, is exactly the single worker's batch.
    assert [len(two_log[r]) for r in (0, 1)] == [1, 1] and len(one_log[0]) == 1
    for key in ("user_index", "statement_index"):
        assert two_log[0][0][key] + two_log[1][0][key] == one_log[0][0][key]
    # Each worker's loss averages its own rows against all 8 columns; their mean is the 8-row loss.
    mean_loss = (two_log[0][0]["local_loss"] + two_log[1][0]["local_loss"]) / 2
    assert mean_loss == pytest.approx(one_log[0][0]["local_loss"], rel=1e-5)
    assert two_log[0][0]["local_loss"] != pytest.approx(two_log[1][0]["local_loss"], rel=1e-3)
    assert one_grads.keys() == two_grads.keys() and len(one_grads) > 10
    assert all(g is not None and g.abs().sum() > 0 for g in one_grads.values())
    for name, grad in one_grads.items():
        torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_killed_worker_resumes_from_last_checkpoint_without_repeating_or_losing_steps(ray_session, tmp_path):
    out = tmp_path / "ft"
    config = _config(out, "training.max_steps=6", "training.checkpoint_every_steps=2", "training.keep_checkpoints=2",
                     "training.log_every_steps=1",
                     "model.batch_size=4", "distributed.num_workers=2", "distributed.zero_stage=2",
                     "distributed.max_failures=1", "model.negative_sampling=random", "model.num_negative_samples=2")
    marker = out / "killed.txt"
    probe = TrainProbe(batch_log_dir=str(out / "batches"), fail_at_step=3, fail_rank=1, fail_marker=str(marker))
    result = run_training(config, probe=probe)

    assert marker.is_file(), "the worker was not killed"
    assert result.steps == 6
    logs = _batch_log(out / "batches")
    # Worker r's batch k is the r-th slice of 4 rows of step k's rows in the plan.
    planned: dict[tuple[int, int], dict[str, list[int]]] = {}
    for row_index, row in enumerate(result.plan.rows):
        slot = planned.setdefault((row["step"], (row_index // 4) % 2), {"user_index": [], "statement_index": []})
        slot["user_index"].append(row["user_index"])
        slot["statement_index"].append(row["statement_index"])
    for rank in (0, 1):
        attempts: dict[int, list[dict]] = {}
        for entry in logs[rank]:
            attempts.setdefault(entry["pid"], []).append(entry)
        first, second = sorted(attempts.values(), key=lambda a: a[0]["resumed_from"])
        assert len(attempts) == 2 and first[0]["resumed_from"] == 0
        # The second attempt starts from the checkpoint of step 2 (the crash came after step 3)...
        assert second[0]["resumed_from"] == 2 and [e["step"] for e in second] == [3, 4, 5, 6]
        assert [e["step"] for e in first] == [1, 2, 3]  # step 4 cannot finish without the dead rank
        # ...so the run's lineage (steps up to the checkpoint, then the resumed attempt) is 1..6 exactly once,
        lineage = [e for e in first if e["step"] <= 2] + second
        assert [e["step"] for e in lineage] == [1, 2, 3, 4, 5, 6]
        # ...each step on the data the plan gives it, and step 3 redone on the very same data.
        for entry in lineage:
            for key in ("user_index", "statement_index"):
                assert entry[key] == planned[(entry["step"], rank)][key]
        assert first[2]["user_index"] == second[0]["user_index"]
    # Ray Train kept the last two checkpoints; the final one is the result and the exported model.
    kept = sorted(p.name for p in Path(result.run_dir).glob("step_*"))
    assert kept == ["step_000004", "step_000006"]
    steps_logged = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 3, 4, 5, 6]  # the resumed attempt logs from the step after the checkpoint
    assert UUEModel.from_pretrained(result.model_dir).config.batch_size == 4


def test_zero3_export_is_the_single_process_format_and_equals_the_engine_weights(ray_session, tmp_path):
    out = tmp_path / "z3"
    ds_json = tmp_path / "zero3_small.json"  # partition every parameter, however small (tiny model)
    base = json.loads((REPO_ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    base["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_json.write_text(json.dumps(base))
    config = _config(out, "training.max_steps=2", "model.batch_size=4", "distributed.num_workers=2",
                     "distributed.zero_stage=3", f"distributed.deepspeed_config={ds_json}")
    result = run_training(config, probe=TrainProbe(weights_dump_dir=str(out)))

    exported = UUEModel.from_pretrained(result.model_dir)
    gathered = torch.load(out / "gathered_weights.pt")
    state = exported.state_dict()
    assert gathered.keys() <= state.keys() and len(gathered) > 10
    for name, value in gathered.items():
        assert value.numel() > 0, f"{name} is an empty ZeRO-3 partition"
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    initial = UUEModel.from_config(config.model, seed=config.training.seed).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in gathered.items()), "training changed nothing"
    # Same files as the single-process export, and each tower loads on its own.
    reference = UUEModel.from_config(config.model).save_pretrained(tmp_path / "single")
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(result.model_dir)) for p in result.model_dir.rglob("*") if p.is_file()) == files
    for tower in ("user_tower", "item_tower"):
        module, _ = load_tower(result.model_dir / tower)
        prefix = f"{tower}."
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, state[prefix + key], rtol=0, atol=0)


def test_two_node_cluster_places_a_worker_on_each_node_and_sees_every_pair_once(tmp_path, sample_data_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "ray_multinode_train.py"), str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["nodes"]) == 2
    logs = _batch_log(tmp_path / "batch_log")
    placed = {rank: {e["node"] for e in entries} for rank, entries in logs.items()}
    assert sorted(n for nodes in placed.values() for n in nodes) == summary["nodes"]  # one node per worker

    dataset = load_dataset(sample_data_dir)
    users, statements = sorted(dataset.users), sorted(dataset.statements)
    seen = Counter((users[u], statements[s]) for entries in logs.values() for e in entries
                   for u, s in zip(e["user_index"], e["statement_index"], strict=True))
    expected = Counter(dataset.positive_pairs("train"))
    assert seen == expected  # every training pair exactly once in the epoch, across both nodes
    per_user = Counter(u for u, _ in seen.elements())
    assert per_user == Counter(u for u, _ in expected.elements())  # every training user, with all its pairs
    assert summary["steps"] == len(expected) // 16


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--preset", "tiny", "--steps", "3", "--output", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_result.json").read_text())
    assert result["steps_measured"] >= 1 and result["tokens_per_second"] > 0
    assert 0 < result["mfu"] < 1
    assert "tokens/s" in proc.stdout and "46,000" in proc.stdout
