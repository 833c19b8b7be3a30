"""One GPU check of issue 23, in one command: the towers table, the Ray step at both shapes, indexing 100k statements.

Each part is a bench script run in its own process under its own time limit (a part that fails or runs out of
time is reported and the others still run), with its log beside the results:

  towers         bench/gpu_train.py --mode towers: user tower fwd+bwd+AdamW on MovieLens-length chunks, plain HF
                 padded + SDPA, HF + torch.compile, and the packed path with compiled layers and full packs
  ray-production bench/gpu_train.py --mode ray --shapes production: the Ray Train + DeepSpeed ZeRO-2 step at the
                 shape of configs/qwen3-embedding-0.6b.yaml, padded and the chosen path (--paths)
  ray-tiny       the same at 8 users x 8 chunks x 256 tokens
  index          bench/gpu_index.py: 100k statements through the packed indexing job vs raw HF bf16

Then one table (each figure beside its peer) and one JSON, gpu_check.json, under --out ($OUT on the GPU machine).

    bash bench/gpu_check.sh                 # on the GPU machine: sources .gpu/env.sh, writes under $OUT
    python bench/gpu_check.py --dry-run     # CPU: tiny shapes, 2 steps, the one-process runner, the raw index peer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOWER_VARIANTS = "hf_padded_sdpa,hf_compiled,packed_compiled"
CHOSEN_PATH = "packed_compiled"
"""The Ray step's path beside padded: on the H200 (DESIGN.md section 7) packed + compiled layers was 1.25x padded
at the tiny shape. Change it with --paths once the production rows say otherwise."""
LIMITS_S = {"towers": 170, "ray-production": 140, "ray-tiny": 80, "index": 70}
"""Seconds per part on the GPU: 460 s in all, under the 8 minutes the check is meant to take (estimates until the
first GPU run: a part out of time is reported, run it again alone with more, --parts P --limits S)."""
PEER_TOKENS_PER_SECOND = "hf_compiled"
"""The towers row the Ray step's user tokens/s is compared with (issue 23: production shape >= 1.0x it)."""


@dataclass
class Part:
    """One bench run: its command, time limit, and where its result JSON lands."""

    name: str
    command: list[str]
    limit_s: float
    result: Path
    status: str = "not run"
    seconds: float = 0.0
    log: Path | None = None
    data: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "runs" / "gpu_check"),
                        help="results folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of the script: tiny random towers and shapes, 2 steps, the one-process runner")
    parser.add_argument("--paths", default=f"padded,{CHOSEN_PATH}",
                        help="Ray step paths (default: %(default)s; dry run: padded,packed)")
    parser.add_argument("--parts", default="towers,ray-production,ray-tiny,index",
                        help="comma list of the parts to run (default: all)")
    parser.add_argument("--limits", default=None,
                        help=f"seconds per part, in --parts order (default: {LIMITS_S}; dry run: 300 each)")
    parser.add_argument("--statements", type=int, default=100_000, help="index: statements (default: %(default)s)")
    return parser.parse_args(argv)


def build_parts(args: argparse.Namespace, out: Path) -> list[Part]:
    """The commands of the check (GPU) or of its dry run (CPU, tiny)."""
    py = [sys.executable]
    towers = [*py, "bench/gpu_train.py", "--mode", "towers", "--variants", TOWER_VARIANTS, "--output",
              str(out / "towers")]
    ray = [*py, "bench/gpu_train.py", "--mode", "ray", "--lengths", "table"]  # the towers' MovieLens lengths
    index = [*py, "bench/gpu_index.py", "--result", str(out / "index" / "gpu_index.json")]
    paths = args.paths
    if args.dry_run:
        paths = "padded,packed" if args.paths == parse_args([]).paths else args.paths
        towers += ["--dry-run"]
        ray += ["--runner", "local", "--preset", "tiny", "--steps", "2", "--warmup-steps", "1", "--users", "2",
                "--chunks", "2", "--chunk-tokens", "32", "--production-users", "2", "--production-chunks", "4",
                "--production-chunk-tokens", "32"]
        # The raw peer alone: the indexing job's Ray start-up would double the dry run (tests/test_gpu_index_bench.py
        # runs the job on CPU).
        index += ["--variants", "", "--preset", "tiny", "--count", "200", "--raw-count", "200", "--workdir",
                  str(out / "index" / "work")]
    else:
        towers += ["--streams", "movielens", "--lengths", "table", "--steps", "10", "--warmup-steps", "4"]
        index += ["--variants", "packed", "--count", str(args.statements), "--raw-count", "25000"]
    ray += ["--paths", paths]
    production = [*ray, "--shapes", "production", "--output", str(out / "ray-production")]
    if not args.dry_run:
        production += ["--steps", "6", "--warmup-steps", "2"]  # ~570k useful tokens a step: seconds each
    tiny = [*ray, "--shapes", "tiny", "--output", str(out / "ray-tiny")]
    if not args.dry_run:
        tiny += ["--steps", "14", "--warmup-steps", "5"]
    commands = {
        "towers": (towers, out / "towers" / "towers_result.json"),
        "ray-production": (production, out / "ray-production" / "bench_result.json"),
        "ray-tiny": (tiny, out / "ray-tiny" / "bench_result.json"),
        "index": (index, out / "index" / "gpu_index.json"),
    }
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in commands]
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}: known {', '.join(commands)}")
    if args.limits:
        limits = [float(s) for s in args.limits.split(",")]
        if len(limits) != len(names):
            raise SystemExit(f"--limits needs one value per part ({len(names)}), got {args.limits!r}")
    else:
        limits = [300.0 if args.dry_run else float(LIMITS_S[n]) for n in names]
    return [Part(name, commands[name][0], limit, commands[name][1])
            for name, limit in zip(names, limits, strict=True)]


def run_part(part: Part, out: Path) -> None:
    """Run one part under its limit; its stdout and stderr go to <out>/<name>.log."""
    part.log = out / f"{part.name}.log"
    part.result.unlink(missing_ok=True)
    started = time.perf_counter()
    with part.log.open("w") as log:
        log.write("$ " + " ".join(part.command) + "\n")
        log.flush()
        try:
            code = subprocess.run(part.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=part.limit_s).returncode
            part.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            part.status = f"timed out after {part.limit_s:.0f} s"
    part.seconds = time.perf_counter() - started
    if part.result.is_file():
        part.data = json.loads(part.result.read_text())
    elif part.status == "ok":
        part.status = f"no result file ({part.result.name})"
    print(f"  {part.name:15s} {part.status} in {part.seconds:.0f} s (log {part.log})", flush=True)


def table_rows(parts: dict[str, Part]) -> list[dict]:
    """One row per figure: what it is, its value and unit, its peer and the ratio to it."""
    rows: list[dict] = []
    towers = parts.get("towers")
    tower_rate: dict[str, float] = {}
    if towers and towers.data:
        for r in towers.data["rows"]:
            tower_rate[r["variant"]] = r["useful_tokens_per_second"]
            rows.append({"part": "towers", "what": f"user tower {r['variant']} ({r['stream']} lengths)",
                         "value": r["useful_tokens_per_second"], "unit": "useful tok/s", "mfu": r["mfu"],
                         "fill": r.get("pack_fill"), "peer": "hf_padded_sdpa", "ratio": r.get("vs_hf_padded_sdpa")})
    peer = tower_rate.get(PEER_TOKENS_PER_SECOND)
    for name in ("ray-production", "ray-tiny"):
        part = parts.get(name)
        for r in (part.data.get("rows", []) if part else []):
            value = r["user_tokens_per_second_per_worker"]
            rows.append({"part": name, "what": f"Ray step {r['shape']} {r['path']} ({r['batch']})", "value": value,
                         "unit": "user tok/s/worker", "mfu": r["mfu"], "fill": r.get("pack_fill"),
                         "step_seconds": r["step_seconds_mean"], "peak_memory_gib": r.get("peak_memory_gib"),
                         "phases": r["phase_seconds_mean"], "peer": PEER_TOKENS_PER_SECOND if peer else None,
                         "ratio": value / peer if peer else None, "vs_padded": r.get("vs_padded")})
    index = parts.get("index")
    if index and index.data:
        raw = index.data["raw_stmt_per_s"]
        rows.append({"part": "index", "what": f"raw HF item tower, {index.data['count']} statements",
                     "value": raw, "unit": "stmt/s", "peer": None, "ratio": None})
        for r in index.data["rows"]:
            rows.append({"part": "index", "what": f"indexing job {r['variant']} (after start-up "
                                                  f"{r['steady_stmt_per_s']:,.0f}/s, {r['ratio_after_startup']:.2f}x)",
                         "value": r["job_stmt_per_s"], "unit": "stmt/s", "peer": "raw HF",
                         "ratio": r["ratio_end_to_end"]})
    return rows


def print_table(rows: list[dict], parts: list[Part], wall: float, out: Path) -> None:
    print(f"\nGPU check ({wall:.0f} s in all; {out / 'gpu_check.json'})")
    for part in parts:
        print(f"  {part.name:15s} {part.status}, {part.seconds:.0f} s")
    print(f"{'part':15s} {'figure':62s} {'value':>12s} {'unit':17s} {'MFU':>6s} {'fill':>5s} {'peer':>15s} "
          f"{'ratio':>6s}")
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "-"
        fill = f"{r['fill']:.2f}" if r.get("fill") else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        print(f"{r['part']:15s} {r['what'][:62]:62s} {r['value']:12,.0f} {r['unit']:17s} {mfu:>6s} {fill:>5s} "
              f"{r['peer'] or '-':>15s} {ratio:>6s}")
    for r in rows:
        if r.get("phases"):
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
            print(f"  {r['what'][:60]}: {r['step_seconds']:.3f} s/step = {phases}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    parts = build_parts(args, out)
    started = time.perf_counter()
    for part in parts:
        run_part(part, out)
    wall = time.perf_counter() - started
    rows = table_rows({p.name: p for p in parts})
    result = {
        "dry_run": args.dry_run, "wall_seconds": wall, "paths": args.paths,
        "device": next((p.data.get("device") for p in parts if p.data.get("device")), None),
        "parts": {p.name: {"status": p.status, "seconds": p.seconds, "limit_s": p.limit_s, "log": str(p.log),
                           "command": p.command, "result": p.data} for p in parts},
        "table": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print_table(rows, parts, wall, out)
    return 0 if all(p.status == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
