"""GPU indexing throughput: the Ray Data indexing job (padded, packed, packed + compiled actors) vs plain
Hugging Face bf16 padded inference of the same item tower.

On one GPU (the lead's command; Ray, DeepSpeed and usearch come from the bundle; --count defaults to 1M there):
    source .gpu/env.sh && PYTHONPATH=. python3 bench/gpu_index.py --result $OUT/gpu_index.json
    (one variant per command if the 10-minute limit is tight: --variants packed-compiled)
Here on CPU, as a check of the script (padded and packed; packed-compiled on request):
    .venv/bin/python bench/gpu_index.py --preset tiny --count 500

Variants (index.attention / index.compile_layers of the job): "padded" (the actors tokenize, pad and run
the Hugging Face forward, today's default), "packed" (a Ray Data CPU stage tokenizes into ragged ids while
the actors encode earlier batches padding-free), "packed-compiled" (the same with each transformer layer
under torch.compile). Each prints statements/s end to end (the job's wall time: start-up, reading,
encoding, Parquet, HNSW) and after start-up (rows after the first encoded batch over the stream's time
after it), each as a ratio to the peer.

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
import shutil
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


VARIANTS = {"padded": ("padded", False), "packed": ("packed", False), "packed-compiled": ("packed", True)}


def make_statements(count: int, max_length: int = 32, mixed: bool = False) -> list[dict[str, str]]:
    """Distinct statements long enough that every one fills --max-length byte tokens (as in the anchor), or
    (mixed) cut to lengths drawn uniformly from 4..max_length bytes, where padding costs the padded path."""
    import numpy as np

    cuts = np.random.default_rng(0).integers(4, max(5, max_length + 1), size=count) if mixed else None
    rows = []
    for i in range(count):
        text = (f"#{i} a {ADJECTIVES[i % 10]} person who would enjoy {TOPICS[(i // 10) % len(TOPICS)]} "
                f"and talks about it with friends")
        cut = len(text) if cuts is None else max(int(cuts[i]), len(str(i)) + 3)  # "#<i> a": texts stay distinct
        rows.append({"statement_id": f"s{i:07d}", "text": text[:cut]})
    return rows


def raw_inference(item_tower_dir: Path, texts: list[str], batch_size: int, device: str, dtype: str) -> float:
    """Statements/s of the tower's plain Hugging Face padded forward (SDPA) + pooling + head, on pre-tokenized,
    device-resident batches: the peer, and the ceiling of the padded job."""
    import torch

    from uue.data.featurize import Featurizer
    from uue.model.folder import read_tower_config
    from uue.model.inputs import TowerInput
    from uue.model.uue_model import load_tower

    tower, tokenizer = load_tower(item_tower_dir, map_location=device)
    tower.to(getattr(torch, dtype))
    featurizer = Featurizer(read_tower_config(item_tower_dir), tokenizer, tokenizer)
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
            tower(TowerInput(ids, mask))
        sync()
        start = time.perf_counter()
        for ids, mask in batches:
            tower(TowerInput(ids, mask))
        sync()
        seconds = time.perf_counter() - start
    del tower, batches
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return len(texts) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-0.6b-random", help="item tower backbone (default: %(default)s)")
    parser.add_argument("--count", type=int, default=None,
                        help="statements to index (default: 1,000,000 on a GPU, 500 on CPU)")
    parser.add_argument("--raw-count", type=int, default=25_000,
                        help="statements for the raw-inference peer (default: %(default)s, or --count if smaller)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per statement (default: %(default)s)")
    parser.add_argument("--lengths", choices=("full", "mixed"), default="full",
                        help="full: every statement --max-length tokens (the anchor); mixed: 4..max-length")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all on a GPU; padded,packed on "
                             "CPU, where inductor compiling would dominate a dry run; '': the raw peer alone, no Ray)")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help="packed variants: tokens per pack (default: the model's pack_tokens, 8192)")
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
    from uue.index import StatementIndex
    from uue.index.build import build_index
    from uue.model import UUEModel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    count = args.count or (1_000_000 if cuda else 500)
    chosen = args.variants if args.variants is not None else ("padded,packed,packed-compiled" if cuda else
                                                              "padded,packed")
    variants = [v for v in chosen.split(",") if v]  # none (--variants ''): the raw peer alone, no Ray
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (use {', '.join(VARIANTS)})")
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
    statements = make_statements(count, args.max_length, mixed=args.lengths == "mixed")
    (work / "data" / "statements").mkdir(parents=True, exist_ok=True)
    shards = 8
    for part in range(shards):
        pq.write_table(pa.Table.from_pylist(statements[part::shards]),
                       work / "data" / "statements" / f"part-{part:02d}.parquet")
    setup_seconds = time.perf_counter() - t0

    texts = [s["text"] for s in statements[: min(args.raw_count, count)]]
    del statements
    raw_rate = raw_inference(work / "model" / "item_tower", texts, args.batch_size, device, dtype)

    # Append, never replace: on the GPU machine Ray itself is importable only through the inherited PYTHONPATH.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if variants:
        ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows: list[dict] = []
    reference: dict[str, np.ndarray] | None = None  # the first variant's vectors of a sample of statements
    rng = np.random.default_rng(0)
    for variant in variants:
        attention, compiled = VARIANTS[variant]
        out = work / f"index-{variant}"
        start = time.perf_counter()
        manifest = build_index(work / "model", work / "data", out, min_actors=actors, max_actors=actors,
                               batch_size=args.batch_size, gpus_per_actor=1 if cuda else 0, dtype="auto",
                               progress=False, attention=attention, compile_layers=compiled,
                               pack_tokens=args.pack_tokens if attention == "packed" else None)
        job_seconds = time.perf_counter() - start
        index = StatementIndex.load(out)
        queries = index.vectors[rng.choice(len(index), 100, replace=False)]
        queries = queries + 0.1 * rng.normal(size=queries.shape).astype(np.float32)
        exact = index.search(queries, 10, exact=True)
        ann = index.search(queries, 10)
        recall = float(np.mean([len({r[0] for r in a} & {r[0] for r in e}) / 10
                                for a, e in zip(ann, exact, strict=True)]))
        sample = index.ids[:: max(1, len(index) // 2000)]
        vectors = {sid: index.statement(sid)[1].copy() for sid in sample}
        agreement = None
        if reference is None:
            reference, reference_name = vectors, variant
        else:
            shared = [sid for sid in vectors if sid in reference]
            a = np.stack([vectors[sid] for sid in shared])
            b = np.stack([reference[sid] for sid in shared])
            agreement = {"vs": reference_name, "statements": len(shared),
                         "max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float((a * b).sum(1).min())}
        del index
        shutil.rmtree(out)  # 1M x 1024 floats + the HNSW graph per variant would fill the disk
        build = manifest["build"]
        rate = count / job_seconds
        rows.append({"variant": variant, "attention": attention, "compile_layers": compiled,
                     "job_seconds": round(job_seconds, 1), "job_stmt_per_s": round(rate, 1),
                     "steady_stmt_per_s": build["steady_statements_per_second"],
                     "ratio_end_to_end": round(rate / raw_rate, 3),
                     "ratio_after_startup": round(build["steady_statements_per_second"] / raw_rate, 3),
                     "first_batch_s": build["first_batch_seconds"], "recall_at_10": recall,
                     "vectors_agree": agreement, "build": build})
    if variants:
        ray.shutdown()

    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{count} statements ({args.lengths} lengths, <= {args.max_length} tokens), {args.preset}, {dtype}, "
          f"batch {args.batch_size}, {actors} actor(s), {name}, torch {torch.__version__}")
    print(f"{'':44s} {'stmt/s':>9s} {'vs HF':>7s} {'after start-up':>15s} {'vs HF':>7s}")
    print(f"{'plain HF ' + dtype + ' padded, pre-tokenized (' + str(len(texts)) + ')':44s} {raw_rate:9.1f} "
          f"{1.0:6.2f}x")
    for row in rows:
        print(f"{'Ray Data job, ' + row['variant']:44s} {row['job_stmt_per_s']:9.1f} {row['ratio_end_to_end']:6.2f}x "
              f"{row['steady_stmt_per_s']:15.1f} {row['ratio_after_startup']:6.2f}x")
    if cuda:
        print(f"DESIGN.md anchor (H100, 32 tokens): {ANCHOR_H100_SEQ_PER_S_32_TOKENS} seq/s; the peer here is "
              f"{raw_rate / ANCHOR_H100_SEQ_PER_S_32_TOKENS:.2f}x the anchor")
    for row in rows:
        build, agree = row["build"], row["vectors_agree"]
        same = (f"; vs {agree['vs']} on {agree['statements']} statements: max |diff| {agree['max_abs_diff']:.2e}, "
                f"min cosine {agree['min_cosine']:.6f}") if agree else ""
        print(f"{row['variant']}: job {row['job_seconds']:.1f} s, first encoded batch after "
              f"{build['first_batch_seconds']:.1f} s, ANN inserts {build['ann_add_seconds']:.1f} s (waited "
              f"{build['ann_wait_seconds']:.1f} s after the stream), recall@10 vs exact {row['recall_at_10']:.3f}"
              f"{same}")
    print(f"setup {setup_seconds:.1f} s")
    result = {"device": name, "count": count, "lengths": args.lengths, "max_length": args.max_length,
              "batch_size": args.batch_size, "preset": args.preset, "raw_stmt_per_s": round(raw_rate, 1),
              "rows": rows}
    print(json.dumps(result))
    if args.result:
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
