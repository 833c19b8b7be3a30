"""GPU indexing throughput: the Ray Data indexing job vs raw bf16 inference of the same item tower.

On one GPU (the lead's command; Ray, DeepSpeed and usearch come from the bundle):
    source .gpu/env.sh && PYTHONPATH=. python3 bench/gpu_index.py --count 100000 --result $OUT/gpu_index.json
Here on CPU, as a check of the script:
    .venv/bin/python bench/gpu_index.py --preset tiny --count 500

The item tower is a random model in the shape of Qwen3-Embedding-0.6B (`qwen3-0.6b-random`: hidden 1024,
28 layers, 16 heads, 8 KV heads) with a byte tokenizer; every statement is cut to --max-length tokens
(DESIGN.md section 7 anchor: 5,400 sequences/s at 32 tokens on an H100). The peer is the same tower in
bf16 encoding pre-tokenized batches already on the device, in one process: the ceiling for the job, which
adds reading, tokenizing, Ray scheduling, actor start and model load, Parquet shards and the HNSW index.
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

ANCHOR_H100_SEQ_PER_S_32_TOKENS = 5400
ADJECTIVES = ["curious", "patient", "restless", "careful", "cheerful", "quiet", "bold", "thrifty", "sporty", "arty"]
TOPICS = ["mountain hiking", "live jazz", "home cooking", "chess openings", "cup finals", "modern poetry",
          "vegetable gardens", "small-boat sailing", "horror films", "role-playing games", "astronomy",
          "sourdough", "cycling tours", "opera", "street photography", "knitting", "surfing", "board games"]


def make_statements(count: int) -> list[dict[str, str]]:
    """Distinct statements long enough that every one fills --max-length byte tokens (as in the anchor)."""
    return [{"statement_id": f"s{i:07d}",
             "text": f"#{i} a {ADJECTIVES[i % 10]} person who would enjoy {TOPICS[(i // 10) % len(TOPICS)]} "
                     f"and talks about it with friends"}
            for i in range(count)]


def raw_inference(item_tower_dir: Path, texts: list[str], batch_size: int, device: str, dtype: str) -> float:
    """Statements/s of the bare tower on pre-tokenized, device-resident batches (the ceiling)."""
    import torch

    from uue.config import ModelConfig
    from uue.data.featurize import Featurizer
    from uue.model.uue_model import load_tower

    tower, tokenizer = load_tower(item_tower_dir, map_location=device)
    tower.to(getattr(torch, dtype))
    meta = json.loads((item_tower_dir / "tower.json").read_text())
    featurizer = Featurizer(ModelConfig.model_validate(meta["model_config"]), tokenizer, tokenizer)
    batches = []
    for start in range(0, len(texts), batch_size):
        feats = featurizer.statement_features(texts[start : start + batch_size])
        batches.append((torch.as_tensor(feats["item_input_ids"]).to(device),
                        torch.as_tensor(feats["item_attention_mask"]).to(device)))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for ids, mask in batches[:3]:  # warm-up (kernels, allocator)
            tower(ids, mask)
        sync()
        start = time.perf_counter()
        for ids, mask in batches:
            tower(ids, mask)
        sync()
        seconds = time.perf_counter() - start
    del tower, batches
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return len(texts) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-0.6b-random", help="item tower backbone (default: %(default)s)")
    parser.add_argument("--count", type=int, default=100_000, help="statements to index (default: %(default)s)")
    parser.add_argument("--raw-count", type=int, default=25_000,
                        help="statements for the raw-inference peer (default: %(default)s, or --count if smaller)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per statement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=None, help="actor pool size (default: GPUs, or 1 on CPU)")
    parser.add_argument("--workdir", default=None, help="keep model, input and index here (default: a temp dir)")
    parser.add_argument("--result", default=None, help="also write the result JSON to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from uue.config import ModelConfig
    from uue.indexing import StatementIndex, build_index
    from uue.model import UUEModel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    gpus = torch.cuda.device_count() if cuda else 0
    actors = args.actors or (gpus if cuda else 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_index_"))
    t0 = time.perf_counter()

    # Only the item tower matters here: the user tower is the tiny preset so the model saves and loads fast.
    hidden = 32 if args.preset.startswith("tiny") else 1024
    config = ModelConfig(user_model_name="tiny", item_model_name=args.preset, embedding_dim=hidden,
                         attention_heads=4, max_statement_length=args.max_length, max_context_length=0,
                         max_chunk_length=32, num_chunks_per_user=2, dropout=0.0)
    model = UUEModel.from_config(config)
    if cuda:
        model = model.to(torch.bfloat16)  # halves the checkpoint written and read by every actor
    model.save_pretrained(work / "model")
    del model
    statements = make_statements(args.count)
    (work / "data" / "statements").mkdir(parents=True, exist_ok=True)
    shards = 8
    for part in range(shards):
        rows = statements[part::shards]
        pq.write_table(pa.Table.from_pylist(rows), work / "data" / "statements" / f"part-{part:02d}.parquet")
    setup_seconds = time.perf_counter() - t0

    texts = [s["text"] for s in statements[: min(args.raw_count, args.count)]]
    raw_rate = raw_inference(work / "model" / "item_tower", texts, args.batch_size, device, dtype)

    # Append, never replace: on the GPU machine Ray itself is importable only through the inherited PYTHONPATH.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    manifest = build_index(work / "model", work / "data", work / "index", min_actors=actors, max_actors=actors,
                           batch_size=args.batch_size, gpus_per_actor=1 if cuda else 0, dtype="auto", progress=False)
    job_seconds = time.perf_counter() - start
    ray.shutdown()

    index = StatementIndex.load(work / "index")
    rng = np.random.default_rng(0)
    queries = index.vectors[rng.choice(len(index), 100, replace=False)]
    queries = queries + 0.1 * rng.normal(size=queries.shape).astype(np.float32)
    exact = index.search(queries, 10, exact=True)
    ann = index.search(queries, 10)
    recall = float(np.mean([len({r[0] for r in a} & {r[0] for r in e}) / 10 for a, e in zip(ann, exact, strict=True)]))

    build = manifest["build"]
    job_rate = args.count / job_seconds
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.count} statements x {args.max_length} tokens, {args.preset}, {dtype}, batch {args.batch_size}, "
          f"{actors} actor(s), {name}, torch {torch.__version__}")
    print(f"{'':46s} {'stmt/s':>9s} {'vs raw':>8s}")
    print(f"{'raw ' + dtype + ' inference, pre-tokenized (' + str(len(texts)) + ')':46s} {raw_rate:9.1f} "
          f"{1.0:7.2f}x")
    print(f"{'Ray Data indexing job, end to end':46s} {job_rate:9.1f} {job_rate / raw_rate:7.2f}x")
    if cuda:
        print(f"DESIGN.md anchor (H100, 32 tokens): {ANCHOR_H100_SEQ_PER_S_32_TOKENS} seq/s; raw here is "
              f"{raw_rate / ANCHOR_H100_SEQ_PER_S_32_TOKENS:.2f}x the anchor")
    print(f"job: {job_seconds:.1f} s, first encoded batch after {build['first_batch_seconds']:.1f} s, ANN inserts "
          f"{build['ann_add_seconds']:.1f} s (waited {build['ann_wait_seconds']:.1f} s after the stream); "
          f"setup {setup_seconds:.1f} s; ANN recall@10 vs exact: {recall:.3f}")
    result = {"device": name, "count": args.count, "raw_stmt_per_s": round(raw_rate, 1),
              "job_stmt_per_s": round(job_rate, 1), "ratio": round(job_rate / raw_rate, 3),
              "job_seconds": round(job_seconds, 1), "first_batch_s": build["first_batch_seconds"],
              "recall_at_10": recall, "build": build}
    print(json.dumps(result))
    if args.result:
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
