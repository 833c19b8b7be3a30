"""Training throughput through the Ray Train + DeepSpeed path, against DESIGN.md's plain Hugging Face anchors.

Runs what `python -m ray_jobs.train` runs (`uue.train.ray.run_training`: Ray Data preprocessing -> user shards
streamed to TorchTrainer -> DeepSpeed engine -> `train_step`) on a synthetic data-contract folder whose chunks fill
`--chunk-tokens`, so that every step processes `users x chunks x chunk_tokens` user-tower tokens, like
the anchor's batch of 64 x 256 tokens. Prints tokens/s, model FLOPs utilisation (6 x non-embedding
backbone parameters x tokens / time / peak) and peak GPU memory beside the anchors (H100, random
Qwen3-Embedding-0.6B shape, plain HF + SDPA: 46,000 tokens/s = 13% MFU), and writes bench_result.json.

    # GPU (H100), from the repo root, with the Ray + DeepSpeed bundle of ../shared/gpu/pack.sh:
    source .gpu/env.sh && PYTHONPATH=. python3 bench/gpu_train.py --steps 30
    # CPU smoke test (tiny random towers):
    .venv/bin/python bench/gpu_train.py --preset tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ANCHOR_TOKENS_PER_SECOND = 46_000  # DESIGN.md section 7: H100, plain HF + SDPA, batch 64 x 256, bf16
ANCHOR_MFU = 0.13
H100_BF16_PEAK_FLOPS = 989e12

WORDS = ("river summit ledger violin orbit harvest lantern cipher meadow falcon quartz ember tide forge "
         "pixel marble canyon signal velvet glacier compass thunder willow saffron beacon mosaic").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-0.6b-random", help="backbone of both towers (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="first steps left out of the timing (default: min(5, steps // 3))")
    parser.add_argument("--users", type=int, default=8, help="users per worker per step (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=8, help="chunks per user (default: %(default)s)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default: %(default)s)")
    parser.add_argument("--statement-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="(default: %(default)s)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                        help="one GPU per worker; auto: when CUDA is available (default: %(default)s)")
    parser.add_argument("--chunk-checkpointing", action="store_true",
                        help="recompute chunk activations in backward (off: comparable with the plain-HF anchor)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_FLOPS / 1e12,
                        help="accelerator peak for MFU (default: H100 bf16 dense, %(default)s)")
    parser.add_argument("--output", default=str(REPO_ROOT / "runs" / "bench_gpu_train"), help="(default: %(default)s)")
    return parser.parse_args(argv)


def write_synthetic_data(folder: Path, users: int, chunks: int, chunk_chars: int, statements: int) -> Path:
    """A data-contract folder: `users` users with `chunks` long chunks each, one positive statement each."""
    from uue.data.readers import write_table

    rng = random.Random(0)

    def text(chars: int) -> str:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    def chunk(c: int) -> dict:
        return {"text": text(chunk_chars), "platform": "forum", "timestamp": f"2025-01-{1 + c % 28:02d}T12:00:00Z"}

    write_table(folder, "users", [{"user_id": f"u{u:05d}", "chunks": [chunk(c) for c in range(chunks)]}
                                  for u in range(users)])
    write_table(folder, "statements", [
        {"statement_id": f"s{s:03d}", "text": f"statement {s}: " + text(120)} for s in range(statements)
    ])
    write_table(folder, "labels", [
        {"user_id": f"u{u:05d}", "statement_id": f"s{u % statements:03d}", "label": 1, "split": "train"}
        for u in range(users)
    ])
    return folder


def non_embedding_parameters(preset: str) -> int:
    """Backbone parameters that multiply every token (input embeddings excluded), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel

    from uue.model import backbone

    if preset.lower() in backbone.RANDOM_PRESETS:
        config = backbone._tiny_config(preset.lower(), len(backbone.build_byte_tokenizer()))
    else:
        config = AutoConfig.from_pretrained(backbone.resolve_model_name(preset))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from uue.config import load_config
    from uue.train.ray import run_training

    use_gpu = args.gpu == "yes" or (args.gpu == "auto" and torch.cuda.is_available())
    warmup = args.warmup_steps if args.warmup_steps is not None else min(5, args.steps // 3)
    if args.steps <= warmup:
        raise SystemExit(f"--steps {args.steps} must exceed the {warmup} warm-up steps")
    out = Path(args.output).resolve()
    users_total = args.steps * args.workers * args.users  # one epoch = exactly --steps steps
    data = write_synthetic_data(out / "data", users_total, args.chunks, 5 * args.chunk_tokens, statements=64)
    worker_cpus = max(4, (os.cpu_count() or 8) // 2) if use_gpu else 0.5  # threads for the towers' CPU init
    random_decoder = args.preset.lower() != "tiny"
    hidden_dims = ["model.embedding_dim=1024", "model.attention_heads=8"] if random_decoder else []
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        f"model.user_model_name={args.preset}", f"model.item_model_name={args.preset}", *hidden_dims,
        f"model.max_chunk_length={args.chunk_tokens}", f"model.max_statement_length={args.statement_tokens}",
        "model.max_context_length=0", f"model.num_chunks_per_user={args.chunks}", f"model.batch_size={args.users}",
        "model.negative_sampling=none", "model.num_negative_samples=0", "model.learning_rate=1e-5",
        f"model.gradient_checkpointing_chunks={str(args.chunk_checkpointing).lower()}",
        f"model.encode_micro_batch={args.users * args.chunks}",
        f"data.path={data}", f"training.output_dir={out / 'run'}", f"training.max_steps={args.steps}",
        "training.log_every_steps=1", "training.checkpoint_every_steps=null",
        f"distributed.num_workers={args.workers}", f"distributed.use_gpu={str(use_gpu).lower()}",
        f"distributed.zero_stage={args.zero_stage}", "distributed.gpus_per_worker=1",
        f"distributed.cpus_per_worker={worker_cpus}", f"distributed.featurize_cpus={1 if use_gpu else 0.5}",
        "distributed.resumable_final_checkpoint=false", f"distributed.storage_path={out / 'ray_train'}",
    ])
    metrics_file = out / "run" / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), object_store_memory=2_000_000_000,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    started = time.perf_counter()
    try:
        result = run_training(config)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started

    history = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    timed = history[warmup:]
    seconds = sum(r["step_seconds"] for r in timed)
    processed = sum(r["processed_tokens"] for r in timed)
    real = sum(r["tokens"] for r in timed)
    params = non_embedding_parameters(args.preset)
    tokens_per_second = processed / seconds
    mfu = 6 * params * tokens_per_second / (args.peak_tflops * 1e12 * args.workers)
    peak_memory = max((r.get("peak_memory_gib", 0.0) for r in history), default=0.0) or None
    summary = {
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "preset": args.preset,
        "workers": args.workers, "zero_stage": args.zero_stage, "bf16": use_gpu,
        "batch": f"{args.users} users x {args.chunks} chunks x {args.chunk_tokens} tokens per worker",
        "steps": result.steps, "steps_measured": len(timed), "non_embedding_params": params,
        "tokens_per_second": tokens_per_second, "real_tokens_per_second": real / seconds,
        "mfu": mfu, "peak_memory_gib": peak_memory, "data_wait_seconds": sum(r["data_seconds"] for r in timed),
        "step_seconds_mean": seconds / len(timed), "final_loss": history[-1]["loss"], "wall_seconds": wall,
    }
    (out / "bench_result.json").write_text(json.dumps(summary, indent=2))

    print(f"\nUUE training through Ray Train + DeepSpeed ZeRO-{args.zero_stage} ({summary['device']}, "
          f"{args.workers} worker(s), preset {args.preset}, {summary['batch']}, "
          f"{len(timed)} timed steps after {warmup} warm-up; full log {metrics_file})")
    rows = [
        ("tokens/s (per worker)", f"{tokens_per_second / args.workers:,.0f}", f"{ANCHOR_TOKENS_PER_SECOND:,}",
         f"{tokens_per_second / args.workers / ANCHOR_TOKENS_PER_SECOND:.2f}x"),
        ("MFU", f"{100 * mfu:.3g}%", f"{ANCHOR_MFU:.0%}", f"{mfu / ANCHOR_MFU:.3g}x"),
        ("peak memory (GiB)", f"{peak_memory:.1f}" if peak_memory else "n/a (CPU)", "-", "-"),
        ("step time (s)", f"{summary['step_seconds_mean']:.3f}", "-", "-"),
        ("data wait, timed steps (s)", f"{summary['data_wait_seconds']:.2f}", "-", "-"),
    ]
    print(f"{'metric':28s} {'this run':>14s} {'anchor (plain HF)':>18s} {'ratio':>8s}")
    for name, value, anchor, ratio in rows:
        print(f"{name:28s} {value:>14s} {anchor:>18s} {ratio:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
