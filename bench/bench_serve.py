"""Serving benchmark: the Ray Serve application against a bare FastAPI + uvicorn server (same model, one process).

For statement embedding (one statement per request) and user embedding (one user of `--chunks` chunks per
request) at each concurrency, both servers get the same bounded number of requests; the table shows
throughput and p50/p99 latency of each and the ratio Serve / peer, all measured in this run on this
machine. The servers run one after the other, never at the same time.

CPU (2 cores, MiniLM, < 4 min):   .venv/bin/python -m bench.bench_serve
GPU (Qwen3-Embedding-0.6B shape, random weights, offline):
    python -m bench.bench_serve --preset qwen3-embedding-0.6b --backbone qwen3-0.6b-random --device cuda \
        --dtype bfloat16 --cores 4 --chunks 32 --user-batch-chunks 512 --statement-batch 128 --scale 4

Serve runs one replica per tower (batching with `@serve.batch`); each tower replica reserves `--cores`
logical CPUs so its torch threads match the peer's (Ray sets OMP_NUM_THREADS from num_cpus).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = ("mountain trail dawn ridge camera film recipe garden chess guitar novel museum river coffee match "
         "league stadium painting sketch bread pasta synth vinyl concert dog shelter code robot telescope").split()


@dataclass
class Result:
    server: str
    kind: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def make_payloads(kind: str, count: int, chunks: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    if kind == "statements":
        return [{"statements": [f"enjoys {_text(rng, 6)}"]} for _ in range(count)]
    return [{"users": [{"chunks": [_text(rng, 40) for _ in range(chunks)]}]} for _ in range(count)]


async def drive(url: str, kind: str, payloads: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    """Send every payload with `concurrency` requests in flight; (seconds, latencies, failures)."""
    path = "/embed/statements" if kind == "statements" else "/embed/users"
    queue: asyncio.Queue = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                payload = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(path, json=payload)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failures


def run_suite(server: str, url: str, args: argparse.Namespace) -> list[Result]:
    results = []
    for kind in args.kinds:
        base = args.statement_requests if kind == "statements" else args.user_requests
        asyncio.run(drive(url, kind, make_payloads(kind, 4 * 2, args.chunks, seed=99), 2))  # warm-up
        for concurrency in args.concurrency:
            count = max(concurrency, int(base * args.scale * (1 + np.log2(concurrency) / 2)))
            payloads = make_payloads(kind, count, args.chunks, seed=concurrency)
            seconds, latencies, failures = asyncio.run(drive(url, kind, payloads, concurrency))
            result = Result(server, kind, concurrency, count, seconds, latencies, failures)
            print(f"  {server:5s} {kind:10s} c={concurrency:<3d} {count:5d} req  {result.throughput:8.1f} req/s  "
                  f"p50 {result.percentile(50):8.1f} ms  p99 {result.percentile(99):8.1f} ms  "
                  f"failed {failures}", flush=True)
            results.append(result)
    return results


def wait_ready(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {seconds} s")


def bench_peer(model_dir: Path, args: argparse.Namespace) -> list[Result]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cores), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bench.bench_serve", "--run-peer", str(model_dir), "--port", str(port),
               "--device", args.device, "--dtype", args.dtype]
    process = subprocess.Popen(command, cwd=REPO, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return run_suite("peer", f"http://127.0.0.1:{port}", args)
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_serve(model_dir: Path, args: argparse.Namespace) -> list[Result]:
    import ray
    from ray import serve

    from serve.app import build_app
    from uue.serving.settings import ServeArgs

    gpus = 1 if args.device.startswith("cuda") else 0
    # Each tower replica reserves `cores` logical CPUs, so both fit and each runs `cores` torch threads.
    ray.init(address="local", num_cpus=2 * args.cores + 1, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tower = {"num_cpus": args.cores, "num_gpus": 0.5 * gpus, "min_replicas": 1, "max_replicas": 1,
             "device": args.device, "dtype": args.dtype, "batch_wait_timeout_s": args.batch_wait_s}
    serve_args = ServeArgs(
        model_dir=str(model_dir),
        user_tower={**tower, "max_batch_size": args.user_batch_chunks, "max_ongoing_requests": args.user_batch_chunks},
        item_tower={**tower, "max_batch_size": args.statement_batch, "max_ongoing_requests": 4 * args.statement_batch},
        ingress={"num_cpus": 1, "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 512},
    )
    try:
        serve.run(build_app(serve_args), name="uue", route_prefix="/")
        wait_ready(f"http://127.0.0.1:{port}")
        return run_suite("serve", f"http://127.0.0.1:{port}", args)
    finally:
        serve.shutdown()
        ray.shutdown()


def print_ratios(peer: list[Result], served: list[Result]) -> None:
    print("\nRay Serve vs bare FastAPI+uvicorn (peer), same model, same machine, this run:")
    print(f"{'kind':10s} {'conc':>4s} | {'peer req/s':>10s} {'serve req/s':>11s} {'ratio':>6s} | "
          f"{'p50 peer':>8s} {'p50 serve':>9s} {'ratio':>6s} | {'p99 peer':>8s} {'p99 serve':>9s} {'ratio':>6s}")
    for p, s in zip(peer, served, strict=True):
        print(f"{p.kind:10s} {p.concurrency:4d} | {p.throughput:10.1f} {s.throughput:11.1f} "
              f"{s.throughput / p.throughput:5.2f}x | {p.percentile(50):7.1f}ms {s.percentile(50):8.1f}ms "
              f"{s.percentile(50) / p.percentile(50):5.2f}x | {p.percentile(99):7.1f}ms {s.percentile(99):8.1f}ms "
              f"{s.percentile(99) / p.percentile(99):5.2f}x")
    failures = sum(r.failures for r in peer + served)
    print(f"failed requests: {failures}   (throughput ratio > 1: Serve faster; latency ratio < 1: Serve faster)")


def build_model(args: argparse.Namespace, folder: Path) -> Path:
    from uue.config import load_config
    from uue.model import UUEModel

    overrides = [f"model.{tower}_model_name={args.backbone}" for tower in ("user", "item")] if args.backbone else []
    config = load_config(REPO / "configs" / f"{args.preset}.yaml", overrides).model
    UUEModel.from_config(config, seed=0).save_pretrained(folder)
    return folder


def run_peer_server(model_dir: str, port: int, device: str, dtype: str) -> None:
    import uvicorn

    from uue.serving.local import build_local_app

    app = build_local_app(model_dir, device=None if device == "auto" else device, dtype=dtype)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minilm", help="configs/<preset>.yaml (random heads, preset backbones)")
    parser.add_argument("--backbone", help="override both towers' backbone, e.g. qwen3-0.6b-random (GPU, offline)")
    parser.add_argument("--model-dir", help="a saved UUE model folder instead of building one from --preset")
    parser.add_argument("--kinds", nargs="+", default=["statements", "users"], choices=["statements", "users"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--statement-requests", type=int, default=60, help="requests at concurrency 1 (grows with c)")
    parser.add_argument("--user-requests", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8, help="chunks per user in user requests (40 words each)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="torch threads per server/tower")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--statement-batch", type=int, default=32, help="item tower max_batch_size (statements)")
    parser.add_argument("--user-batch-chunks", type=int, default=128, help="user tower max_batch_size (chunks)")
    parser.add_argument("--batch-wait-s", type=float, default=0.005)
    parser.add_argument("--run-peer", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.run_peer:
        run_peer_server(args.run_peer, args.port, args.device, args.dtype)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="uue-bench-serve-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else build_model(args, Path(tmp) / "model")
        print(f"model {model_dir} ({args.preset} {args.backbone or ''}), device {args.device} {args.dtype}, "
              f"{args.cores} cores")
        peer = bench_peer(model_dir, args)
        served = bench_serve(model_dir, args)
    print_ratios(peer, served)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
