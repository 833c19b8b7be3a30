"""Does the training data path scale? Driver memory, object store and throughput vs users, epochs and labels.

For synthetic data sets at three sizes (16x apart in users; 20 chunks x 300 characters and 5 positives per
user), each step in its own process: Ray preprocessing (users/s, its driver's peak RSS and the object store's
peak), then for 1 and 10 epochs a Ray Train run
(2 CPU workers) and the single-process trainer over the same shards, both with a model that does no work
(TrainProbe(data_only=True): the stream is read, shuffled and collated, no forward/backward). Reported:
driver peak RSS (the process that calls run_training), the object store's peak use (polled every 0.2 s),
and users/s of each loop. The driver holds no per-pair plan: its memory must not grow with epochs and grow
far slower than the data with users. A last row preprocesses the largest size again with --label-factor (10)
times the labels per user (50 instead of 5, all positives): the preprocessing driver must stay flat, since
the labels are grouped per user inside Ray Data.

    .venv/bin/python bench/bench_data_scale.py            # ~10 min on 2 cores; --sizes 200 800 3200 by default
    .venv/bin/python bench/bench_data_scale.py --preprocess-only    # the preprocessing columns and labels row
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
TINY = REPO_ROOT / "configs" / "tiny.yaml"


def _overrides(out: Path, epochs: int) -> list[str]:
    return [f"training.output_dir={out}", "training.max_steps=null", f"model.num_epochs={epochs}",
            "model.batch_size=16", "model.positives_per_user=5", "model.num_negative_samples=0",
            "model.negative_sampling=none", "model.num_chunks_per_user=20", "model.max_chunk_length=64",
            "training.log_every_steps=1", "training.checkpoint_every_steps=null", "distributed.num_workers=2",
            "distributed.cpus_per_worker=0.5", "distributed.featurize_cpus=0.5"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ray_init():
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=1_000_000_000, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    return ray


class StorePeak:
    """Polls the object store's used bytes (cluster total - available) in a thread."""

    def __init__(self, ray):
        self.ray, self.peak, self.stop = ray, 0.0, False
        self.total = ray.cluster_resources().get("object_store_memory", 0.0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            used = self.total - self.ray.available_resources().get("object_store_memory", self.total)
            self.peak = max(self.peak, used)
            time.sleep(0.2)

    def close(self) -> float:
        self.stop = True
        self.thread.join()
        return self.peak / 2**20


def stage_data(folder: Path, users: int, labels_per_user: int = 5) -> dict:
    import random

    from bench.gpu_train import WORDS
    from uue.data.readers import write_table

    rng = random.Random(users)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(50))

    write_table(folder, "users", [{"user_id": f"u{u:06d}", "chunks": [
        {"text": text(), "platform": "forum", "timestamp": f"2025-01-{1 + c % 28:02d}T12:00:00Z"} for c in range(20)]}
        for u in range(users)])
    statements = max(64, labels_per_user)  # a user's labels name distinct statements
    write_table(folder, "statements", [{"statement_id": f"s{s:03d}", "text": f"statement {s}: {text()[:80]}"}
                                       for s in range(statements)])
    write_table(folder, "labels", [{"user_id": f"u{u:06d}", "statement_id": f"s{(u * 7 + k) % statements:03d}",
                                    "label": 1, "split": "train"}
                                   for u in range(users) for k in range(labels_per_user)])
    return {"bytes": sum(p.stat().st_size for p in folder.iterdir()), "labels": users * labels_per_user}


def stage_preprocess(raw: Path, pre: Path, users: int) -> dict:
    from uue.config import load_config
    from uue.data.preprocess import preprocess

    ray = _ray_init()
    store = StorePeak(ray)
    started = time.perf_counter()
    preprocess(str(raw), str(pre), load_config(TINY, _overrides(pre.parent / "p", 1)), max_actors=2,
               batch_size=64, overwrite=True)
    seconds = time.perf_counter() - started
    peak = store.close()
    ray.shutdown()
    return {"users_per_s": users / seconds, "seconds": seconds, "driver_peak_rss_mib": _peak_rss_mib(),
            "object_store_peak_mib": peak}


def _users_per_second(metrics_file: Path) -> float:
    """Users per second after the first batch (which waits for the stream to start)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    if len(rows) < 2:
        return rows[0]["users"] / rows[0]["seconds"]
    return sum(r["users"] for r in rows[1:]) / (rows[-1]["seconds"] - rows[0]["seconds"])


def stage_ray(pre: Path, out: Path, epochs: int) -> dict:
    from uue.config import load_config
    from uue.train import TrainProbe
    from uue.train.ray import run_training

    ray = _ray_init()
    store = StorePeak(ray)
    config = load_config(TINY, [*_overrides(out, epochs), f"data.path={pre}"])
    result = run_training(config, probe=TrainProbe(data_only=True, resumable_final_checkpoint=False))
    peak = store.close()
    ray.shutdown()
    return {"steps": result.steps, "users_per_s": _users_per_second(out / "metrics.jsonl"),
            "driver_peak_rss_mib": _peak_rss_mib(), "object_store_peak_mib": peak}


def stage_local(pre: Path, out: Path, epochs: int) -> dict:
    from uue.config import load_config
    from uue.train import TrainProbe, UUETrainer

    config = load_config(TINY, [*_overrides(out, epochs), f"data.path={pre}", "distributed.num_workers=1"])
    result = UUETrainer(config, probe=TrainProbe(data_only=True)).fit()
    return {"steps": result.steps, "users_per_s": _users_per_second(out / "metrics.jsonl"),
            "peak_rss_mib": _peak_rss_mib()}


def _child(stage: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _preprocess_row(root: Path, users: int, labels_per_user: int) -> dict:
    """Write the synthetic data and preprocess it (each in its own process); prints and returns the row."""
    data = _child("data", str(root / "raw"), str(users), str(labels_per_user))
    prep = _child("preprocess", str(root / "raw"), str(root / "pre"), str(users))
    print(f"users {users:6d}, labels {data['labels']:8d} ({data['bytes'] / 2**20:6.1f} MiB raw): preprocess "
          f"{prep['users_per_s']:7.1f} users/s ({prep['seconds']:6.1f} s), driver peak RSS "
          f"{prep['driver_peak_rss_mib']:7.1f} MiB, object store peak {prep['object_store_peak_mib']:7.1f} MiB",
          flush=True)
    return {"users": users, "labels": data["labels"], "raw_mib": data["bytes"] / 2**20, "preprocess": prep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=3, default=[200, 800, 3200])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--label-factor", type=int, default=10,
                        help="the labels row: this many times the 5 labels per user, at the largest size (0: no row)")
    parser.add_argument("--preprocess-only", action="store_true", help="skip the training runs")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_data_scale"))
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        fn = {"data": stage_data, "preprocess": stage_preprocess, "ray": stage_ray, "local": stage_local}[args.stage]
        typed = [int(a) if a.isdigit() else Path(a) for a in args.args]
        print(json.dumps(fn(*typed)))
        return 0
    out = Path(args.out)
    results = []
    for users in args.sizes:
        root = out / f"users_{users}"
        results.append(_preprocess_row(root, users, 5))
        prep = results[-1]["preprocess"]
        for epochs in [] if args.preprocess_only else args.epochs:
            ray_run = _child("ray", str(root / "pre"), str(root / f"ray_e{epochs}"), str(epochs))
            local = _child("local", str(root / "pre"), str(root / f"local_e{epochs}"), str(epochs))
            results.append({"users": users, "raw_mib": results[-1]["raw_mib"], "epochs": epochs, "preprocess": prep,
                            "ray": ray_run, "local": local})
            row = results[-1]
            ratio = ray_run["users_per_s"] / local["users_per_s"]
            print(f"users {users:6d} ({row['raw_mib']:6.1f} MiB raw) epochs {epochs:3d}: preprocess "
                  f"{prep['users_per_s']:7.1f} users/s | Ray driver peak RSS {ray_run['driver_peak_rss_mib']:7.1f} MiB,"
                  f" object store peak {ray_run['object_store_peak_mib']:7.1f} MiB,"
                  f" {ray_run['users_per_s']:8.1f} users/s"
                  f" | single process {local['users_per_s']:8.1f} users/s (Ray/single {ratio:.2f}x)", flush=True)
    if args.label_factor:
        users = args.sizes[-1]
        results.append(_preprocess_row(out / f"users_{users}_labels_x{args.label_factor}", users,
                                       5 * args.label_factor))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
