"""Preprocessing throughput: the Ray Data job (`uue.data.preprocess.preprocess`) against its named peer, the same
validation + chunk splitting + `Featurizer` in one process (what `load_dataset` + a loop would do).

    .venv/bin/python -m bench.bench_preprocess --users 400 --chunks 40 --config configs/minilm.yaml --cpus 2

Synthetic users (random words, some posts longer than max_chunk_length so splitting works too) are written to a
temporary data-contract folder; both paths read that folder. Prints users/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from uue.config import load_config
from uue.data.chunking import split_long_chunks
from uue.data.featurize import Featurizer
from uue.data.readers import load_dataset
from uue.data.tokenizers import load_tokenizer

WORDS = ("data model train user post movie film music garden recipe football match weather coffee code "
         "review story night city river mountain book game team score").split()


def write_synthetic(folder: Path, users: int, chunks: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "users.jsonl").open("w") as f:
        for u in range(users):
            posts = []
            for c in range(chunks):
                n = int(rng.integers(5, 200 if c % 10 == 0 else 40))  # every tenth post is long
                posts.append({"text": " ".join(rng.choice(WORDS, n)), "platform": "forum",
                              "timestamp": f"2025-{1 + c % 12:02d}-{1 + c % 28:02d}T00:00:00Z"})
            f.write(json.dumps({"user_id": f"u{u}", "chunks": posts}) + "\n")
    with (folder / "statements.jsonl").open("w") as f:
        for s in range(16):
            f.write(json.dumps({"statement_id": f"s{s}", "text": " ".join(rng.choice(WORDS, 6))}) + "\n")
    with (folder / "labels.jsonl").open("w") as f:
        for u in range(users):
            f.write(json.dumps({"user_id": f"u{u}", "statement_id": f"s{u % 16}", "label": 1}) + "\n")


def single_process(folder: Path, config) -> float:
    started = time.perf_counter()
    dataset = load_dataset(folder)
    model = config.model
    featurizer = Featurizer(model, load_tokenizer(model.user_model_name), load_tokenizer(model.item_model_name))
    for user in dataset.users.values():
        user.chunks = split_long_chunks(user.chunks, featurizer.user_tokenizer, model.max_chunk_length)
        featurizer.user_features(user)
    featurizer.statement_features(list(dataset.statements.values()))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=40, help="posts per user")
    parser.add_argument("--config", default="configs/minilm.yaml")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--max-actors", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config)

    import ray

    from uue.data.preprocess import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "raw"
        write_synthetic(folder, args.users, args.chunks)
        peer = single_process(folder, config)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            started = time.perf_counter()
            report = preprocess(str(folder), str(Path(tmp) / "out"), config, max_actors=args.max_actors)
            ours = time.perf_counter() - started
        finally:
            ray.shutdown()
    assert report.counts["users"].written == args.users
    print(f"{args.users} users x {args.chunks} posts, {config.model.towers.user_model_name} tokenizer, "
          f"{config.model.towers.num_chunks_per_user} x {config.model.towers.max_chunk_length} tokens per user")
    print(f"single process (peer): {peer:7.1f} s  {args.users / peer:8.1f} users/s")
    print(f"Ray Data, {args.cpus} CPUs:     {ours:7.1f} s  {args.users / ours:8.1f} users/s")
    print(f"ratio Ray Data / single process: {peer / ours:.2f}x")


if __name__ == "__main__":
    main()
