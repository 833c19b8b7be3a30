"""Indexing throughput: the Ray Data job (autoscaled item-tower actors) vs one process encoding in a loop.

    .venv/bin/python bench/bench_indexing.py                      # MiniLM, 5,000 statements, 2 CPU actors
    .venv/bin/python bench/bench_indexing.py --preset tiny --count 500

Both sides encode the same statements with the same saved model and the same CPU budget (the job's actors
get one thread each; the single process gets as many threads as the job has actors). The peer is
`UUEInference.encode_statements` with the model already loaded; the job is timed end to end (scheduling,
actor start and model load, encoding, Parquet shards, HNSW index, manifest). Prints statements/s and the
ratio, and how long the job took until its first encoded batch arrived (its fixed start-up cost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

WHO = ["loves", "would enjoy", "is curious about", "spends weekends on", "would pay for lessons in", "writes about",
       "would never try", "grew up with", "is getting into", "would gift a friend something about"]
WHAT = ["hiking in the mountains", "live jazz concerts", "slow-cooked Italian food", "competitive chess",
        "the cup final", "modern poetry", "vegetable gardening", "sailing small boats", "classic horror films",
        "open-world role-playing games", "amateur astronomy", "sourdough baking", "long-distance cycling",
        "Italian opera", "street photography", "knitting sweaters", "surfing cold water", "board games",
        "bird watching", "vintage synthesizers"]
WHEN = ["", " on weekends", " with friends", " every summer", " after work", " since childhood"]


def make_statements(count: int) -> list[dict[str, str]]:
    """Distinct, realistic-length statements (6-14 words), deterministic."""
    rows = []
    for i in range(count):
        text = f"{WHO[i % len(WHO)]} {WHAT[(i // len(WHO)) % len(WHAT)]}{WHEN[(i // 7) % len(WHEN)]}"
        rows.append({"statement_id": f"s{i:06d}", "text": f"{text} (#{i})"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minilm", help="item/user backbone preset (default: %(default)s)")
    parser.add_argument("--count", type=int, default=5000, help="statements to index (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-actors", type=int, default=2)
    parser.add_argument("--max-actors", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep model, input and index here (default: a temp dir)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from uue.config import REPO_ROOT as ROOT
    from uue.config import load_config
    from uue.data.readers import write_table
    from uue.index import StatementIndex
    from uue.index.build import build_index
    from uue.model import UUEModel
    from uue.model.inference import UUEInference

    load_before = os.getloadavg()[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_indexing_"))
    model_config = load_config(ROOT / "configs" / "minilm.yaml").model.model_copy(
        update={"user_model_name": args.preset, "item_model_name": args.preset}
    )
    if args.preset in ("tiny", "tiny-qwen3"):
        model_config = model_config.model_copy(update={"embedding_dim": 32, "attention_heads": 4})
    model_dir = work / "model"
    UUEModel.from_config(model_config).save_pretrained(model_dir)
    statements = make_statements(args.count)
    write_table(work / "data", "statements", statements)

    # --- peer: one process, model loaded, encode loop over the same statements -------------------------
    threads = args.max_actors
    torch.set_num_threads(threads)
    encoder = UUEInference(model_dir, device="cpu", batch_size=args.batch_size)
    texts = [s["text"] for s in statements]
    encoder.encode_statements(texts[: args.batch_size])  # warm-up
    start = time.perf_counter()
    single = encoder.encode_statements(texts)
    single_seconds = time.perf_counter() - start
    del encoder

    # --- the Ray Data job -------------------------------------------------------------------------------
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)  # append
    ray.init(address="local", num_cpus=args.max_actors + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    manifest = build_index(model_dir, work / "data", work / "index", min_actors=args.min_actors,
                           max_actors=args.max_actors, batch_size=args.batch_size, progress=False)
    job_seconds = time.perf_counter() - start
    ray.shutdown()

    index = StatementIndex.load(work / "index")
    by_id = {sid: i for i, sid in enumerate(index.ids)}
    job_vectors = index.vectors[[by_id[s["statement_id"]] for s in statements]]
    max_diff = float(abs(job_vectors - single).max())

    build = manifest["build"]
    single_rate = args.count / single_seconds
    job_rate = args.count / job_seconds
    print(f"\nindexing {args.count} statements, preset {args.preset}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average before/after "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (other processes skew both sides)")
    print(f"{'':42s} {'seconds':>9s} {'stmt/s':>9s} {'vs single':>10s}")
    print(f"{'single process encode loop (' + str(threads) + ' threads)':42s} {single_seconds:9.2f} "
          f"{single_rate:9.1f} {1.0:9.2f}x")
    print(f"{'Ray Data job, end to end':42s} {job_seconds:9.2f} {job_rate:9.1f} {job_rate / single_rate:9.2f}x")
    print(f"job start-up until the first batch: {build['first_batch_seconds']:.1f} s; "
          f"ANN inserts {build['ann_add_seconds']:.2f} s (waited {build['ann_wait_seconds']:.2f} s after the stream)")
    print(f"actors {args.min_actors}..{args.max_actors} x 1 CPU; max |job vector - single-process vector| = "
          f"{max_diff:.2e}")
    print(json.dumps({"single_stmt_per_s": round(single_rate, 1), "job_stmt_per_s": round(job_rate, 1),
                      "ratio": round(job_rate / single_rate, 3), "job_first_batch_s": build["first_batch_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
