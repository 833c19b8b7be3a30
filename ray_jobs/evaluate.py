"""Evaluation job: score a trained model on a data-contract folder's test labels, beside the baseline.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python -m ray_jobs.evaluate --model runs/qwen3/model --data s3://bucket/raw --out runs/qwen3/eval

Writes OUT/metrics.json, OUT/report.md and plots (`uue.evaluation.evaluate_model`). The job's driver
does the work, so point --model/--out at storage the head node sees (local disk or a shared mount).
Exit status: 0 on success, 2 on bad arguments, model or data.
"""

from __future__ import annotations

import argparse
import json
import sys

from uue.data.schema import DataValidationError
from uue.data.tokenizers import ModelNotAvailableError
from uue.evaluation import add_evaluation_arguments
from uue.model.folder import resolve_model_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder, checkpoint folder or training output_dir")
    add_evaluation_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from uue.evaluation import evaluate_model

    try:
        model_dir = resolve_model_dir(args.model)
        result = evaluate_model(model_dir, args.data, args.out, split=args.split, k=args.k,
                                baseline=not args.no_baseline, progress=False)
    except (FileNotFoundError, DataValidationError, ModelNotAvailableError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    overall = result.get("overall", {})
    print(json.dumps({"model": str(model_dir), "out": args.out,
                      **{key: overall.get(key) for key in ("auc", f"ndcg@{args.k}", "f1")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
