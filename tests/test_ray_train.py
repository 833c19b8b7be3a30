"""Ray Train + DeepSpeed: config building, one loop (1 Ray worker == `uue train`, from shards alone), fault
tolerance with exact resume, ZeRO-3 export, a two-node cluster with the frozen-backbone caches, the job entry
point and the GPU bench's CPU mode.

Each Ray Train fit costs ~30 s on 2 idle cores, so the fits are few: equivalence 1 (+ one local run), fault
tolerance 1 (with a restart), ZeRO-3 export 1, multi-node 1 (own process), bench 1 (own process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from uue.config import load_config
from uue.data.readers import load_dataset
from uue.data.shards import Shards
from uue.model.backbone import TINY_HIDDEN
from uue.model.uue_model import UUEModel, load_tower
from uue.train import TrainProbe, UUETrainer
from uue.train.ray import deepspeed_config, run_training

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


def test_train_job_rejects_a_bad_config_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--config", str(TINY), "distributed.zero_stage=4"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "distributed.zero_stage" in proc.stderr


# ---------------------------------------------------------------------------------- Ray Train fits
def _train_users() -> set[str]:
    dataset = load_dataset(REPO_ROOT / "uue" / "data" / "sample_data")
    return {u for u, _ in dataset.positive_pairs("train")}


@pytest.mark.slow
def test_one_ray_worker_equals_uue_train_from_the_shards_alone(ray_session, tmp_path):
    """Ray preprocessing writes the shards; with the raw folder gone, 1 Ray worker (DeepSpeed ZeRO-0) and the
    single-process trainer run the same loop over the same stream: the same per-step losses."""
    import shutil

    from uue.data.preprocess import preprocess

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    shutil.copytree(REPO_ROOT / "uue" / "data" / "sample_data", raw)
    overrides = ("training.max_steps=null", "model.num_epochs=2", "model.dropout=0.0", "model.positives_per_user=2",
                 "training.log_every_steps=1", "distributed.zero_stage=0", "model.label_loss_weight=0.5",
                 "model.negative_sampling=random", "model.num_negative_samples=2")
    preprocess(str(raw), str(pre), _config(tmp_path / "prep", *overrides), max_actors=1, batch_size=16)
    shutil.rmtree(raw)
    assert Shards.open(str(pre)).train_users == 32

    ray_run = _config(tmp_path / "ray", f"data.path={pre}", *overrides)
    probe = TrainProbe(batch_log_dir=str(tmp_path / "ray_batches"))
    result = run_training(ray_run, probe=probe)
    assert result.steps == 8 and result.steps_per_epoch == 4
    metrics = (tmp_path / "ray" / "run" / "metrics.jsonl").read_text().splitlines()
    ray_losses = [json.loads(line)["loss"] for line in metrics]

    local = UUETrainer(_config(tmp_path / "local", f"data.path={pre}", *overrides),
                       probe=TrainProbe(batch_log_dir=str(tmp_path / "local_batches")))
    local_losses = [h["loss"] for h in local.fit().history]
    assert len(ray_losses) == len(local_losses) == 8
    ray_log, local_log = _batch_log(tmp_path / "ray_batches")[0], _batch_log(tmp_path / "local_batches")[0]
    for key in ("user_ids", "statement_index", "item_owner"):
        assert [e[key] for e in ray_log] == [e[key] for e in local_log]
    assert ray_losses[0] == pytest.approx(local_losses[0], rel=1e-6)
    np.testing.assert_allclose(ray_losses, local_losses, rtol=2e-4)
    assert not np.allclose(ray_losses[:4], ray_losses[4:])  # each epoch draws other positives, in another order
    exported = UUEModel.from_pretrained(result.model_dir).state_dict()
    for name, value in local.model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint_without_repeating_or_losing_steps(ray_session, tmp_path):
    out = tmp_path / "ft"
    config = _config(out, "training.max_steps=6", "training.checkpoint_every_steps=2", "training.keep_checkpoints=2",
                     "training.log_every_steps=1", "model.positives_per_user=2",
                     "model.batch_size=4", "distributed.num_workers=2", "distributed.zero_stage=2",
                     "distributed.max_failures=1", "model.negative_sampling=random", "model.num_negative_samples=2",
                     "training.profile_steps=[1,2]")
    marker = out / "killed.txt"
    probe = TrainProbe(batch_log_dir=str(out / "batches"), fail_at_step=3, fail_rank=1, fail_marker=str(marker))
    result = run_training(config, probe=probe)

    assert marker.is_file(), "the worker was not killed"
    assert result.steps == 6 and result.steps_per_epoch == 4  # 32 users / 2 workers / 4 per batch
    logs = _batch_log(out / "batches")
    lineages = {}
    for rank in (0, 1):
        attempts: dict[int, list[dict]] = {}
        for entry in logs[rank]:
            attempts.setdefault(entry["pid"], []).append(entry)
        first, second = sorted(attempts.values(), key=lambda a: a[0]["resumed_from"])
        assert len(attempts) == 2 and first[0]["resumed_from"] == 0
        # The second attempt starts from the checkpoint of step 2 (the crash came after step 3)...
        assert second[0]["resumed_from"] == 2 and [e["step"] for e in second] == [3, 4, 5, 6]
        assert [e["step"] for e in first] == [1, 2, 3]  # step 4 cannot finish without the dead rank
        # ...collating only the batches it trains (steps 1-2 are read past, not padded or encoded)...
        assert [e["collated"] for e in second] == [1, 2, 3, 4]
        # ...so the run's lineage (steps up to the checkpoint, then the resumed attempt) is 1..6 exactly once,
        lineage = [e for e in first if e["step"] <= 2] + second
        assert [e["step"] for e in lineage] == [1, 2, 3, 4, 5, 6]
        # ...and step 3 is redone on the very same users and positives.
        for key in ("user_ids", "statement_index"):
            assert first[2][key] == second[0][key]
        lineages[rank] = lineage
    # Every training user exactly once in epoch 0 (steps 1-4) across both workers; each worker keeps its
    # users in epoch 1, in another order.
    epoch0 = [u for rank in (0, 1) for e in lineages[rank] if e["epoch"] == 0 for u in e["user_ids"]]
    assert Counter(epoch0) == Counter(_train_users())
    for rank in (0, 1):
        mine = {u for e in lineages[rank] if e["epoch"] == 0 for u in e["user_ids"]}
        later = [u for e in lineages[rank] if e["epoch"] == 1 for u in e["user_ids"]]
        assert set(later) <= mine and later != [u for e in lineages[rank][:2] for u in e["user_ids"]]
    # Ray Train kept the last two checkpoints; the final one is the result and the exported model.
    kept = sorted(p.name for p in Path(result.run_dir).glob("step_*"))
    assert kept == ["step_000004", "step_000006"]
    steps_logged = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 3, 4, 5, 6]  # the resumed attempt logs from the step after the checkpoint
    assert UUEModel.from_pretrained(result.model_dir).config.saved() == config.model.saved()  # this run's model
    # Every worker traced the profiled steps (the resumed attempt starts after them); rank 0 alone wrote TensorBoard.
    traces = sorted(p.name for p in (out / "run" / "profile").iterdir())
    assert traces == ["rank0.steps1-2.pt.trace.json", "rank1.steps1-2.pt.trace.json"]
    event_files = list((out / "run" / "tensorboard").glob("events.out.tfevents.*"))
    writers = {p.name.split(".")[-2] for p in event_files}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert event_files and writers <= {str(e["pid"]) for e in logs[0]}


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_node_cluster_places_a_worker_on_each_node_and_sees_every_user_once(tmp_path):
    """Two nodes, one worker each, the demo's frozen-backbone chunk/statement vector caches on: one epoch sees
    every training user exactly once across the nodes; the pretrained path is fitted after the run."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Its own RAY_TMPDIR: `Cluster` records its address in <tmp>/ray/ray_current_cluster, which a later bare
    # `ray.init()` (a `uue` subprocess) would try to join if this run were killed before removing it.
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_TMPDIR=tempfile.mkdtemp(prefix="uue-2n-", dir="/tmp"))
    try:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "ray_multinode_train.py"), str(tmp_path)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["nodes"]) == 2
    logs = _batch_log(tmp_path / "batch_log")
    placed = {rank: {e["node"] for e in entries} for rank, entries in logs.items()}
    assert sorted(n for nodes in placed.values() for n in nodes) == summary["nodes"]  # one node per worker

    seen = Counter(u for entries in logs.values() for e in entries for u in e["user_ids"])
    assert seen == Counter(_train_users())  # every training user exactly once in the epoch, across both nodes
    assert summary["steps"] == 32 // 16
    assert summary["output_dim"] == 16 + TINY_HIDDEN + 1  # the pretrained path was fitted after the Ray run


def test_a_pretrained_path_on_shards_alone_is_refused_before_training(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    config = _config(tmp_path, f"data.path={shards}", "model.freeze_user_backbone=true",
                     "model.freeze_item_backbone=true", "model.use_attention_pooling=false",
                     "model.pretrained_path_weight=0.5")
    with pytest.raises(ValueError, match="preprocessed shards only"):
        run_training(config)


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--mode", "ray", "--preset", "tiny", "--shapes", "tiny",
         "--steps", "3", "--output", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    [row] = json.loads((tmp_path / "bench_result.json").read_text())["rows"]
    assert (row["shape"], row["path"], row["steps"]) == ("tiny", "padded", 3)
    assert row["steps_measured"] >= 1 and row["tokens_per_second"] > 0
    assert 0 < row["mfu"] < 1 and row["phase_seconds_mean"]["user_tower"] > 0
    assert "tok/s" in proc.stdout and "46,000" in proc.stdout
