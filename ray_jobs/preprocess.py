"""Ray Data preprocessing job: validate, chunk and tokenize a data-contract folder into Parquet shards.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python -m ray_jobs.preprocess --input s3://bucket/raw --output s3://bucket/preprocessed \
        --config configs/qwen3-embedding-0.6b.yaml

Exit status: 0 when the job ran (rejected records are reported, not fatal, unless --max-rejects is
exceeded), 2 on bad arguments, config or input.
"""

from __future__ import annotations

import argparse
import sys

from uue.config import REPO_ROOT, ConfigError, load_config
from uue.data.tokenizers import ModelNotAvailableError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "minilm.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=None,
                        help="data-contract folder: local path or URI (s3://, gs://, file://); default: data.path")
    parser.add_argument("--output", required=True, help="output folder: local path or URI")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config whose model section fixes tokenizers and shapes (default: %(default)s)")
    parser.add_argument("--max-actors", type=int, default=4, help="upper bound of the tokenizing actor pool")
    parser.add_argument("--batch-size", type=int, default=64, help="records per map_batches call")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--max-rejects", type=int, default=None,
                        help="exit with status 1 when more records than this are rejected (default: no limit)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.max_chunk_length=128")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"preprocess: error: {err}", file=sys.stderr)
        return 2

    import ray

    from uue.data.preprocess import preprocess

    ray.init(ignore_reinit_error=True)  # under `ray job submit` this joins the job's cluster
    try:
        report = preprocess(args.input or config.data.path, args.output, config, max_actors=args.max_actors,
                            batch_size=args.batch_size, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ModelNotAvailableError) as err:
        print(f"preprocess: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.max_rejects is not None and report.total_rejected > args.max_rejects:
        print(f"preprocess: {report.total_rejected} rejects exceed --max-rejects {args.max_rejects}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
