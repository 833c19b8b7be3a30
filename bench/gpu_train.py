"""Training throughput of the user tower: plain and compiled Hugging Face against the packed path, then Ray Train.

Part 1, "towers" (one process, one device): the same Qwen3-Embedding-0.6B-shaped user-tower backbone
(preset `qwen3-0.6b-random`, last-token pooling) runs forward + backward + AdamW on the same token stream in
four variants: plain Hugging Face padded + SDPA (`hf_padded_sdpa`), the same under `torch.compile`
(`hf_compiled`), and this project's packed path (uue.model.packing) eager (`packed_eager`) and with
regionally compiled layers (`packed_compiled`); then, on the full-length stream, the packed compiled path
with chunk-level and per-layer activation checkpointing (memory per 1k tokens). Two streams: chunk lengths
drawn from the MovieLens-100K chunks' length distribution (`movielens`: computed from the data via
uue.data.movielens when recbole's copy of the data and the MiniLM tokenizer are installed, else the stored
table below), and every chunk full length (`full`). Padded variants pad every chunk to --chunk-tokens (as
the platform does); packed variants see the ragged chunks. Printed per variant: useful (non-padding)
tokens/s, MFU on useful tokens (6N, uue.model.flops), HFU (8N when
recomputing), peak GiB, GiB per 1k useful tokens of what a step allocates above the weights and optimizer
states (activations + gradients), and the ratios to the two Hugging Face peers.

Part 2, "ray": the full Ray Train + DeepSpeed ZeRO-2 step, what `python -m ray_jobs.train` runs
(`uue.train.ray.run_training`: Ray Data preprocessing -> user shards streamed to TorchTrainer -> DeepSpeed
engine -> `train_step`) on synthetic data-contract folders, one row per --shapes x --paths: "production" is
configs/qwen3-embedding-0.6b.yaml as shipped (32 users x 100 chunks of <= 250 tokens per worker step, its
micro-batches and chunk checkpointing, semi-hard negatives) on chunks of MovieLens lengths; "tiny" is 8 users x
8 chunks x 256 tokens, every chunk full. Paths: padded, padded_compiled (model.compile_backbone), packed,
packed_compiled (model.compile_layers). Each row: user-tower useful tokens/s per worker beside DESIGN.md's anchor
and the padded path, MFU, pack fill, peak memory and the loop's mean per-phase times (time/*: data, user tower,
item tower, loss and gather, backward, optimizer); writes bench_result.json.

    # GPU (H100/H200), from the repo root, with the Ray + DeepSpeed bundle of ../shared/gpu/pack.sh:
    source .gpu/env.sh && PYTHONPATH=. python3 bench/gpu_train.py --output $OUT/bt
    # only the tower comparison (no Ray/DeepSpeed needed):
    PYTHONPATH=. python3 bench/gpu_train.py --mode towers --output $OUT/bt
    # CPU dry run of the tower comparison (tiny-qwen3, float32, seconds):
    .venv/bin/python bench/gpu_train.py --dry-run
    # CPU smoke test of the Ray step (tiny random towers, the tiny shape):
    .venv/bin/python bench/gpu_train.py --mode ray --preset tiny --shapes tiny --steps 3
    # both shapes made small, both paths, the same loop in one process (seconds, no Ray):
    .venv/bin/python bench/gpu_train.py --mode ray --runner local --preset tiny --paths padded,packed --steps 2 \
        --production-users 4 --production-chunks 6 --production-chunk-tokens 32 --users 2 --chunks 2 --chunk-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import shutil
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

# MovieLens-100K chunks (uue.data.movielens defaults, max_chunk_length=256, MiniLM WordPiece tokenizer, chunk text
# as the featurizer writes it, special tokens included): 1,591 chunks, mean 178 tokens; counts per 16-token
# bin (1-16, 17-32, ..., 241-256). Used when the data or tokenizer is not installed; rescaled to --chunk-tokens.
MOVIELENS_LENGTH_BINS = (4, 16, 12, 17, 34, 99, 216, 194, 106, 66, 41, 34, 32, 25, 25, 670)
MOVIELENS_BIN_TOKENS = 256

_BASE_MODELS: dict = {}
VARIANTS = ("hf_padded_sdpa", "hf_compiled", "packed_eager", "packed_compiled")
MEMORY_VARIANTS = ("packed_compiled_ckpt_chunks", "packed_compiled_ckpt_layers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("all", "towers", "ray"), default="all",
                        help="towers: the one-process comparison; ray: the Ray Train step; all: both (default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of the tower comparison: tiny-qwen3, float32, a few tiny steps, no Ray")
    parser.add_argument("--preset", default="qwen3-0.6b-random", help="backbone of both towers (default: %(default)s)")
    parser.add_argument("--device", default=None, help="towers: torch device (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="first steps left out of the timing (default: min(5, steps // 3))")
    parser.add_argument("--chunks-per-step", type=int, default=64,
                        help="towers: chunks per optimizer step (default: %(default)s, the anchor's 64 x 256)")
    parser.add_argument("--pack-tokens", type=int, default=16384,
                        help="towers: tokens per pack of the packed path (default: %(default)s)")
    parser.add_argument("--pack-min-tokens", type=int, default=None,
                        help="towers: narrowest pack (default: pack_tokens // 32; = --pack-tokens: full-width packs)")
    parser.add_argument("--pack-backend", default="auto", choices=("auto", "varlen", "flex", "sdpa_mask"),
                        help="towers: packed attention kernel (default: %(default)s)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled variants (dry run: eager = tracing only)")
    parser.add_argument("--lengths", choices=("movielens", "table"), default="movielens",
                        help="towers: MovieLens lengths from the data (fallback: the stored table) or the table")
    parser.add_argument("--streams", default="movielens,full", help="towers: comma list (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS + MEMORY_VARIANTS),
                        help="towers: comma list (default: all)")
    parser.add_argument("--shapes", default="production,tiny",
                        help=f"ray: comma list of {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--paths", default="padded",
                        help=f"ray: comma list of {', '.join(STEP_PATHS)} (default: %(default)s)")
    parser.add_argument("--runner", choices=("ray", "local"), default="ray",
                        help="ray: Ray Train + DeepSpeed (default); local: the same loop in one process (CPU checks)")
    parser.add_argument("--users", type=int, default=8,
                        help="ray, tiny shape: users per worker per step (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=8, help="ray, tiny shape: chunks per user (default: %(default)s)")
    parser.add_argument("--production-users", type=int, default=None,
                        help="ray, production shape: users per worker step (default: the config's, 32)")
    parser.add_argument("--production-chunks", type=int, default=None,
                        help="ray, production shape: chunks per user (default: the config's, 100)")
    parser.add_argument("--production-chunk-tokens", type=int, default=None,
                        help="ray, production shape: tokens per chunk at most (default: the config's, 250)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk at most (default: %(default)s)")
    parser.add_argument("--statement-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="(default: %(default)s)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                        help="ray: one GPU per worker; auto: when CUDA is available (default: %(default)s)")
    parser.add_argument("--chunk-checkpointing", action="store_true",
                        help="ray: recompute chunk activations in backward (off: comparable with the plain-HF anchor)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_FLOPS / 1e12,
                        help="accelerator peak for MFU (default: H100/H200 bf16 dense, %(default)s)")
    parser.add_argument("--output", default=str(REPO_ROOT / "runs" / "bench_gpu_train"), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.mode, args.preset, args.device = "towers", "tiny-qwen3", args.device or "cpu"
        args.steps, args.warmup_steps, args.chunks_per_step = 2, 1, 6
        args.chunk_tokens, args.pack_tokens, args.lengths, args.compile_backend = 32, 96, "table", "eager"
        args.streams = "movielens"  # one stream, all six variants: the full stream runs the same code
    return args


# --------------------------------------------------------------------------------------- token stream


def movielens_lengths(chunk_tokens: int, source: str) -> tuple[list[int], str]:
    """Chunk lengths of MovieLens-100K at `chunk_tokens` (from the data when possible) and where they came from."""
    if source == "movielens":
        try:
            from uue.data.featurize import chunk_text
            from uue.data.movielens import MovieLensOptions, convert_movielens
            from uue.data.tokenizers import load_tokenizer

            tokenizer_name = "minilm"
            dataset, _ = convert_movielens(MovieLensOptions(max_chunk_length=chunk_tokens, tokenizer=tokenizer_name),
                                           progress=False)
            tokenizer = load_tokenizer(tokenizer_name)
            texts = [chunk_text(c) for user in dataset.users.values() for c in user.chunks]
            lengths = [min(chunk_tokens, len(ids)) for ids in tokenizer(texts)["input_ids"]]
            return lengths, f"MovieLens-100K via uue.data.movielens ({tokenizer_name} tokenizer), {len(lengths)} chunks"
        except Exception as err:  # noqa: BLE001 (any missing piece -> the stored table, said so in the output)
            print(f"MovieLens lengths unavailable ({type(err).__name__}: {err}); using the stored table")
    scale = chunk_tokens / MOVIELENS_BIN_TOKENS
    rng = random.Random(1)
    lengths = []
    for b, count in enumerate(MOVIELENS_LENGTH_BINS):
        lo, hi = 16 * b + 1, 16 * (b + 1)
        lengths += [max(1, min(chunk_tokens, round(rng.randint(lo, hi) * scale))) for _ in range(count)]
    return lengths, f"stored MovieLens-100K table ({sum(MOVIELENS_LENGTH_BINS)} chunks), scaled to {chunk_tokens}"


def token_stream(lengths_pool: list[int], steps: int, chunks_per_step: int, vocab: int, seed: int = 0):
    """`steps` lists of `chunks_per_step` random-token chunks whose lengths are drawn from `lengths_pool`."""
    import torch

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(5, vocab, (rng.choice(lengths_pool),), generator=g) for _ in range(chunks_per_step)]
            for _ in range(steps)]


def left_pad(chunks, length: int):
    """Chunks -> (N, length) ids and mask, left padded as Qwen3-Embedding is."""
    import torch

    ids = torch.zeros(len(chunks), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(chunks):
        ids[i, length - len(c):], mask[i, length - len(c):] = c, 1
    return ids, mask


# ------------------------------------------------------------------------------------------ variants


def run_variant(variant: str, args: argparse.Namespace, stream, device, dtype, warmup: int) -> dict:
    """Forward + backward + AdamW over the stream with one variant; returns its measurements."""
    import torch

    from uue.model import flops
    from uue.model.backbone import TextEncoder, load_backbone
    from uue.model.packing import PackingOptions, take_pack_stats

    if args.preset not in _BASE_MODELS:  # random init of a 0.6B model on the CPU takes seconds: once per run
        _BASE_MODELS[args.preset] = load_backbone(args.preset, seed=0)[0]
    backbone = copy.deepcopy(_BASE_MODELS[args.preset]).to(device=device, dtype=dtype).train()
    params_n = flops.non_embedding_parameters(backbone)
    packed = variant.startswith("packed")
    recompute = "ckpt" in variant
    if packed:
        checkpointing = "chunks" if variant.endswith("ckpt_chunks") else "layers" if recompute else "none"
        encoder = TextEncoder(backbone, "packed", PackingOptions(
            pack_tokens=args.pack_tokens, max_sequences=max(1, args.pack_tokens // 8), backend=args.pack_backend,
            compile_layers="compiled" in variant, checkpointing=checkpointing, max_length=args.chunk_tokens,
            compile_backend=args.compile_backend, min_tokens=args.pack_min_tokens))

        def encode(chunks):
            return encoder.encode_ragged(chunks)
    else:
        model = torch.compile(backbone, backend=args.compile_backend) if variant == "hf_compiled" else backbone

        def encode(chunks):
            ids, mask = left_pad(chunks, args.chunk_tokens)
            ids = ids.to(device, non_blocking=True)
            full = all(len(c) == args.chunk_tokens for c in chunks)
            mask = None if full else mask.to(device, non_blocking=True)  # no mask: SDPA's fast causal kernels
            return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -1]

    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5, fused=device.type == "cuda")
    direction = torch.randn(backbone.config.hidden_size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, useful, computed = [], [], []
    first_step = None
    base = 0
    for step, chunks in enumerate(stream):
        if cuda:
            torch.cuda.synchronize(device)
            if step == warmup:  # weights and AdamW states exist now: what a step adds on top is its working set
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        vectors = encode(chunks)
        loss = (vectors.float() @ direction.float()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if step == 0:
            first_step = elapsed
        step_computed = take_pack_stats(encoder).computed if packed else args.chunk_tokens * len(chunks)
        if step >= warmup:
            times.append(elapsed)
            useful.append(sum(len(c) for c in chunks))
            computed.append(step_computed)
    seconds = sum(times)
    tps = sum(useful) / seconds
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    step_tokens = sum(useful) / len(useful)
    working = (peak - base / 2**30) if peak is not None else None
    processed = (args.chunk_tokens * len(stream[0])) if not packed else None
    result = {
        "variant": variant, "useful_tokens": sum(useful), "steps_measured": len(times),
        "useful_tokens_per_second": tps, "step_seconds_mean": seconds / len(times), "first_step_seconds": first_step,
        "mfu": flops.mfu(tps, params_n, args.peak_tflops * 1e12),
        "hfu": flops.hfu(tps, params_n, recompute, args.peak_tflops * 1e12),
        "peak_memory_gib": peak, "step_memory_gib": working,
        "gib_per_1k_step_tokens": (working / (step_tokens / 1000)) if working else None,
        "padded_tokens_per_step": processed, "non_embedding_params": params_n,
        "pack_fill": sum(useful) / sum(computed),  # useful / computed tokens (padded: chunks x chunk_tokens computed)
    }
    del optimizer, backbone, encode
    gc.collect()  # compiled graphs stay cached: a later variant with the same layer graph reuses them
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_towers(args: argparse.Namespace) -> int:
    """Part 1: the four variants (and the checkpointing choices) on each stream; prints the table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from uue.data.tokenizers import build_byte_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin against each other on a shared CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    warmup = args.warmup_steps if args.warmup_steps is not None else min(5, args.steps // 3)
    if args.steps <= warmup:
        raise SystemExit(f"--steps {args.steps} must exceed the {warmup} warm-up steps")
    vocab = len(build_byte_tokenizer())
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS + MEMORY_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; known: {', '.join(VARIANTS + MEMORY_VARIANTS)}")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, sources = [], {}
    started = time.perf_counter()
    for stream_name in [s for s in args.streams.split(",") if s]:
        if stream_name == "movielens":
            pool, sources[stream_name] = movielens_lengths(args.chunk_tokens, args.lengths)
        elif stream_name == "full":
            pool, sources[stream_name] = [args.chunk_tokens], f"every chunk {args.chunk_tokens} tokens"
        else:
            raise SystemExit(f"unknown stream {stream_name!r} (movielens, full)")
        stream = token_stream(pool, args.steps, args.chunks_per_step, vocab)
        for variant in variants:
            if variant in MEMORY_VARIANTS and stream_name != "full" and "full" in args.streams.split(","):
                continue  # checkpointing's memory is measured on full-length chunks (production: 250 tokens)
            row = run_variant(variant, args, stream, device, dtype, warmup)
            row["stream"] = stream_name
            rows.append(row)
            print(f"  {stream_name:9s} {variant:28s} {row['useful_tokens_per_second']:12,.0f} useful tokens/s "
                  f"(first step {row['first_step_seconds']:.1f} s)", flush=True)
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "preset": args.preset, "chunks_per_step": args.chunks_per_step, "chunk_tokens": args.chunk_tokens,
        "pack_tokens": args.pack_tokens, "pack_min_tokens": args.pack_min_tokens, "pack_backend": args.pack_backend,
        "compile_backend": args.compile_backend, "steps": args.steps, "warmup": warmup,
        "length_sources": sources, "rows": rows, "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    for row in rows:
        peers = {r["variant"]: r for r in rows if r["stream"] == row["stream"]}
        for peer in ("hf_padded_sdpa", "hf_compiled"):
            if peer in peers:
                row[f"vs_{peer}"] = row["useful_tokens_per_second"] / peers[peer]["useful_tokens_per_second"]
    (out / "towers_result.json").write_text(json.dumps(summary, indent=2))

    print(f"\nUser-tower forward+backward+AdamW ({summary['device']}, {dtype}, preset {args.preset}, "
          f"{args.chunks_per_step} chunks/step <= {args.chunk_tokens} tokens, packs of {args.pack_tokens}, "
          f"{args.steps - warmup} timed steps after {warmup}; {out / 'towers_result.json'})")
    for name, source in sources.items():
        print(f"  stream {name}: {source}")
    header = (f"{'stream':9s} {'variant':28s} {'useful tok/s':>12s} {'fill':>5s} {'MFU':>7s} {'HFU':>7s} "
              f"{'peak GiB':>8s} {'GiB/1k':>7s} {'vs HF':>6s} {'vs HF+compile':>13s}")
    print(header)
    for r in rows:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "n/a"
        per_k = f"{r['gib_per_1k_step_tokens']:.2f}" if r["gib_per_1k_step_tokens"] else "n/a"
        vs_hf = f"{r['vs_hf_padded_sdpa']:.2f}x" if "vs_hf_padded_sdpa" in r else "-"
        vs_c = f"{r['vs_hf_compiled']:.2f}x" if "vs_hf_compiled" in r else "-"
        print(f"{r['stream']:9s} {r['variant']:28s} {r['useful_tokens_per_second']:12,.0f} {r['pack_fill']:5.2f} "
              f"{100 * r['mfu']:6.2f}% "
              f"{100 * r['hfu']:6.2f}% {peak:>8s} {per_k:>7s} {vs_hf:>6s} {vs_c:>13s}")
    if device.type == "cpu":
        print("(CPU: MFU/HFU are against --peak-tflops, a GPU figure; only the ratios mean anything here)")
    return 0


SHAPES = ("tiny", "production")
"""Ray step shapes: "tiny" is --users x --chunks chunks of --chunk-tokens (8 x 8 x 256, every chunk full, the rest
of configs/tiny.yaml); "production" is configs/qwen3-embedding-0.6b.yaml as shipped (32 users x 100 chunks of
<= 250 tokens per worker step, its micro-batches, chunk checkpointing, semi-hard negatives) on chunks whose
lengths are drawn from MovieLens (--lengths)."""
STEP_PATHS = {
    "padded": [],
    "padded_compiled": ["model.compile_backbone=true"],
    "packed": ["model.attention=packed"],
    "packed_compiled": ["model.attention=packed", "model.compile_layers=true"],
}
"""How the towers run in the Ray step: the Hugging Face padded forward, compiled whole (compile_backbone), the
packed path, and the packed path with compiled layers."""
PRODUCTION_CONFIG = REPO_ROOT / "configs" / "qwen3-embedding-0.6b.yaml"


def write_synthetic_data(folder: Path, users: int, chunk_lengths: list[list[int]], statements: int,
                         positives: int = 1, platform: str | None = "forum") -> Path:
    """A data-contract folder: user u has chunks of chunk_lengths[u] characters (byte tokenizer: one token each)
    and `positives` positive statements."""
    from uue.data.readers import write_table

    rng = random.Random(0)

    def text(chars: int) -> str:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)[: max(1, chars)]

    def chunk(c: int, chars: int) -> dict:
        return {"text": text(chars), "platform": platform, "timestamp": f"2025-01-{1 + c % 28:02d}T12:00:00Z"}

    write_table(folder, "users", [{"user_id": f"u{u:05d}", "chunks": [chunk(c, n) for c, n in enumerate(lengths)]}
                                  for u, lengths in enumerate(chunk_lengths[:users])])
    write_table(folder, "statements", [
        {"statement_id": f"s{s:03d}", "text": f"statement {s}: " + text(120)} for s in range(statements)
    ])
    write_table(folder, "labels", [
        {"user_id": f"u{u:05d}", "statement_id": f"s{(u + p) % statements:03d}", "label": 1, "split": "train"}
        for u in range(users) for p in range(positives)
    ])
    return folder


def non_embedding_parameters(preset: str) -> int:
    """Backbone parameters that multiply every token (input embeddings excluded), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel

    from uue.data import tokenizers
    from uue.model import backbone

    if preset.lower() in tokenizers.RANDOM_PRESETS:
        config = backbone._tiny_config(preset.lower(), len(tokenizers.build_byte_tokenizer()))
    else:
        config = AutoConfig.from_pretrained(tokenizers.resolve_model_name(preset))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


def special_tokens(preset: str) -> int:
    """Tokens the preset's tokenizer adds to a chunk's text (the byte tokenizer: one token per byte besides)."""
    from uue.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(preset)
    return len(tokenizer("a")["input_ids"]) - 1


def step_config(args: argparse.Namespace, shape: str, path: str, out: Path, use_gpu: bool):
    """The experiment config of one (shape, path) row and its data-contract folder under `out`."""
    from uue.config import load_config

    worker_cpus = max(4, (os.cpu_count() or 8) // 2) if use_gpu else 0.5  # threads for the towers' CPU init
    common = [
        f"model.user_model_name={args.preset}", f"model.item_model_name={args.preset}",
        f"data.path={out / 'data'}", f"training.output_dir={out / 'run'}", f"training.max_steps={args.steps}",
        "training.log_every_steps=1", "training.checkpoint_every_steps=null", "training.tensorboard=false",
        f"training.peak_tflops={args.peak_tflops}", "training.progress_bar=false",
        f"distributed.num_workers={args.workers}", f"distributed.use_gpu={str(use_gpu).lower()}",
        f"distributed.zero_stage={args.zero_stage}", "distributed.gpus_per_worker=1",
        f"distributed.cpus_per_worker={worker_cpus}", f"distributed.featurize_cpus={1 if use_gpu else 0.5}",
        f"distributed.storage_path={out / 'ray_train'}", *STEP_PATHS[path],
    ]
    if shape == "tiny":
        random_decoder = args.preset.lower() != "tiny"
        hidden_dims = ["model.embedding_dim=1024", "model.attention_heads=8"] if random_decoder else []
        config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
            *hidden_dims, f"model.max_chunk_length={args.chunk_tokens}",
            f"model.max_statement_length={args.statement_tokens}", "model.max_context_length=0",
            f"model.num_chunks_per_user={args.chunks}", f"model.batch_size={args.users}",
            "model.negative_sampling=none", "model.num_negative_samples=0", "model.learning_rate=1e-5",
            f"model.gradient_checkpointing_chunks={str(args.chunk_checkpointing).lower()}",
            f"model.encode_micro_batch={args.users * args.chunks}", *common])
        users_total = args.steps * args.workers * args.users  # one epoch = exactly --steps steps
        lengths = [[5 * args.chunk_tokens] * args.chunks] * users_total  # cut to chunk_tokens: every chunk full
        write_synthetic_data(out / "data", users_total, lengths, statements=64)
        return config, f"{args.users} users x {args.chunks} chunks x {args.chunk_tokens} tokens"
    overrides = [f"model.{key}={value}" for key, value in (
        ("batch_size", args.production_users), ("num_chunks_per_user", args.production_chunks),
        ("max_chunk_length", args.production_chunk_tokens)) if value is not None]  # smaller: CPU dry runs
    if args.preset.lower().startswith("tiny"):
        overrides += ["model.embedding_dim=32", "model.attention_heads=4"]
    config = load_config(PRODUCTION_CONFIG, overrides + common)
    towers = config.model.towers
    users_total = args.steps * args.workers * config.model.optim.batch_size
    pool, _ = movielens_lengths(towers.max_chunk_length, args.lengths)
    extra = special_tokens(args.preset)
    rng = random.Random(0)
    lengths = [[max(1, rng.choice(pool) - extra) for _ in range(towers.num_chunks_per_user)]
               for _ in range(users_total)]
    write_synthetic_data(out / "data", users_total, lengths, statements=64, positives=4, platform=None)
    return config, (f"{config.model.optim.batch_size} users x {towers.num_chunks_per_user} chunks of <= "
                    f"{towers.max_chunk_length} tokens (MovieLens lengths)")


def summarize_step(history: list[dict], warmup: int, args: argparse.Namespace) -> dict:
    """Throughput, MFU, memory and mean per-phase times of the timed steps (what the loop logged)."""
    from uue.train.profile import PHASES

    timed = history[warmup:]
    seconds = sum(r["step_seconds"] for r in timed)
    user_tps = sum(r["user_tokens"] for r in timed) / seconds
    phases = [f"time/{name}" for name in PHASES if any(f"time/{name}" in r for r in timed)]
    return {
        "steps_measured": len(timed), "step_seconds_mean": seconds / len(timed),
        "tokens_per_second": user_tps, "user_tokens_per_second_per_worker": user_tps / args.workers,
        "real_tokens_per_second": sum(r["tokens"] for r in timed) / seconds,
        "item_tokens_per_second": sum(r["item_tokens"] for r in timed) / seconds,
        "mfu": sum(r.get("mfu", 0.0) * r["step_seconds"] for r in timed) / seconds,
        "hfu": sum(r.get("hfu", 0.0) * r["step_seconds"] for r in timed) / seconds,
        "pack_fill": (sum(r["pack_fill"] * r["packed_tokens"] for r in timed if "pack_fill" in r)
                      / max(1, sum(r["packed_tokens"] for r in timed if "pack_fill" in r))) or None,
        "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in history), default=0.0) or None,
        "data_wait_seconds": sum(r["data_seconds"] for r in timed), "first_step_seconds": history[0]["step_seconds"],
        "phase_seconds_mean": {k.removeprefix("time/"): sum(r.get(k, 0.0) for r in timed) / len(timed)
                               for k in phases},
        "final_loss": history[-1]["loss"],
    }


def run_ray_step(args: argparse.Namespace) -> int:
    """The full Ray Train + DeepSpeed step (or, --runner local, the same loop in this process) for each shape and
    path; one row each, with the loop's own throughput, MFU and per-phase times."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    use_gpu = args.gpu == "yes" or (args.gpu == "auto" and torch.cuda.is_available())
    warmup = args.warmup_steps if args.warmup_steps is not None else min(5, args.steps // 3)
    if args.steps <= warmup:
        raise SystemExit(f"--steps {args.steps} must exceed the {warmup} warm-up steps")
    shapes = [s for s in args.shapes.split(",") if s]
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(paths) - set(STEP_PATHS))
    if unknown:
        raise SystemExit(f"unknown --shapes/--paths {unknown}; shapes: {', '.join(SHAPES)}; paths: "
                         f"{', '.join(STEP_PATHS)}")
    out = Path(args.output).resolve()
    ray = None
    if args.runner == "ray":
        import ray

        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), object_store_memory=2_000_000_000,
                 include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    rows = []
    started = time.perf_counter()
    try:
        for shape in shapes:
            for path in paths:
                row_out = out / f"{shape}-{path}"
                shutil.rmtree(row_out, ignore_errors=True)
                config, batch = step_config(args, shape, path, row_out, use_gpu)
                row_started = time.perf_counter()
                steps = train_once(config, args.runner)
                history = [json.loads(line) for line in (row_out / "run" / "metrics.jsonl").read_text().splitlines()]
                row = {"shape": shape, "path": path, "batch": batch, "steps": steps,
                       **summarize_step(history, warmup, args), "wall_seconds": time.perf_counter() - row_started}
                rows.append(row)
                print(f"  ray step {shape:10s} {path:16s} {row['user_tokens_per_second_per_worker']:12,.0f} user tok/s "
                      f"per worker, {row['step_seconds_mean']:.3f} s/step (first {row['first_step_seconds']:.1f} s)",
                      flush=True)
    finally:
        if ray is not None:
            ray.shutdown()
    for row in rows:  # ratios to the padded path of the same shape, when it ran
        padded = next((r for r in rows if r["shape"] == row["shape"] and r["path"] == "padded"), None)
        if padded is not None:
            row["vs_padded"] = row["tokens_per_second"] / padded["tokens_per_second"]
    summary = {
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "preset": args.preset, "runner": args.runner,
        "workers": args.workers, "zero_stage": args.zero_stage, "bf16": use_gpu, "steps": args.steps,
        "warmup": warmup, "non_embedding_params": non_embedding_parameters(args.preset), "rows": rows,
        "wall_seconds": time.perf_counter() - started, "torch": torch.__version__,
    }
    (out / "bench_result.json").write_text(json.dumps(summary, indent=2))

    how = f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}" if args.runner == "ray" else "one process (--runner local)"
    print(f"\nUUE training step through {how} ({summary['device']}, {args.workers} worker(s), preset {args.preset}, "
          f"{args.steps - warmup} timed steps after {warmup}; {out / 'bench_result.json'})")
    for shape in shapes:
        batch = next((r["batch"] for r in rows if r["shape"] == shape), "")
        print(f"  {shape}: {batch} per worker step")
    print(f"{'shape':10s} {'path':16s} {'user tok/s/worker':>17s} {'vs anchor':>9s} {'vs padded':>9s} {'MFU':>6s} "
          f"{'s/step':>7s} {'fill':>5s} {'GiB':>6s}  phases (s/step)")
    for r in rows:
        fill = f"{r['pack_fill']:.2f}" if r["pack_fill"] else "-"
        gib = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "n/a"
        vs = f"{r['vs_padded']:.2f}x" if "vs_padded" in r else "-"
        phases = " ".join(f"{k}={v:.3f}" for k, v in r["phase_seconds_mean"].items())
        print(f"{r['shape']:10s} {r['path']:16s} {r['user_tokens_per_second_per_worker']:17,.0f} "
              f"{r['user_tokens_per_second_per_worker'] / ANCHOR_TOKENS_PER_SECOND:8.2f}x {vs:>9s} "
              f"{100 * r['mfu']:5.1f}% {r['step_seconds_mean']:7.3f} {fill:>5s} {gib:>6s}  {phases}")
    print(f"(anchor: plain HF + SDPA, {ANCHOR_TOKENS_PER_SECOND:,} tokens/s on an H100, DESIGN.md section 7"
          f"{'; CPU: only the ratios mean anything' if not use_gpu else ''})")
    return 0


def train_once(config, runner: str) -> int:
    """One training run of `config`: Ray Train + DeepSpeed (what ray_jobs.train runs) or the one-process trainer
    (the same loop and step, for quick CPU checks of this script); returns the steps trained."""
    from uue.train import TrainProbe

    if runner == "ray":
        from uue.train.ray import run_training

        return run_training(config, probe=TrainProbe(resumable_final_checkpoint=False)).steps
    from uue.train import UUETrainer

    return UUETrainer(config).fit().steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = 0
    if args.mode in ("all", "towers"):
        status = run_towers(args)
    if args.mode in ("all", "ray"):
        status = run_ray_step(args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
