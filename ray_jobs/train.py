"""Ray Train + DeepSpeed training job: one worker per GPU (or CPU process), ZeRO stage from the config.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python -m ray_jobs.train --config configs/qwen3-embedding-0.6b.yaml \
        data.path=s3://bucket/preprocessed distributed.num_workers=8

data.path is a `ray_jobs.preprocess` output (its fingerprint must match the config) or a raw data-contract
folder, which is preprocessed first into data.preprocessed_dir. Writes checkpoints under
distributed.storage_path (default: training.output_dir/ray_train) and the final model to
training.output_dir/model, in the same format as `uue train`. `--resume` continues the newest run under the
storage path from its last checkpoint. Exit status: 0 on success, 2 on bad arguments, config or data, 1 when
training failed.
"""

from __future__ import annotations

import argparse
import sys

from uue.config import ConfigError, load_config
from uue.data.schema import DataValidationError
from uue.data.tokenizers import ModelNotAvailableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config under configs/")
    parser.add_argument("--resume", action="store_true", help="continue the newest run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. distributed.num_workers=2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2

    import ray
    from ray.train import TrainingFailedError

    from uue.train.ray import run_training

    ray.init(ignore_reinit_error=True)  # under `ray job submit` this joins the job's cluster
    try:
        result = run_training(config, resume=args.resume)
    except (DataValidationError, ModelNotAvailableError, FileNotFoundError, ValueError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    except TrainingFailedError as err:
        print(f"train: training failed: {err}", file=sys.stderr)
        return 1
    loss = result.metrics.get("loss", float("nan"))
    print(f"trained {result.steps} steps on {config.distributed.num_workers} worker(s), ZeRO-"
          f"{config.distributed.zero_stage}; final loss {loss:.4f}; model: {result.model_dir}; "
          f"checkpoint: {result.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
