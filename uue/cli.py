"""The `uue` command line: local training, inference and the demo on one machine."""

from __future__ import annotations

import argparse
import sys

from uue.config import ConfigError, load_config
from uue.data.schema import DataValidationError
from uue.model.backbone import PRESETS, ModelNotAvailableError


def cmd_train(args: argparse.Namespace) -> int:
    from uue.training import UUETrainer

    config = load_config(args.config, args.overrides)
    trainer = UUETrainer(config)
    result = trainer.fit(resume_from="latest" if args.resume else None)
    last = result.history[-1] if result.history else {}
    print(f"trained {result.steps} steps; final loss {last.get('loss', float('nan')):.4f}; model: {result.model_dir}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        print(f"{preset.name:24s} {preset.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from uue.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uue", description="Universal User Embeddings")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)")
    train.add_argument("--config", required=True, help="YAML file under configs/")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.batch_size=8")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="train the CPU default briefly and show user/statement similarities")
    demo.add_argument("--config", default=None, help="YAML config (default: configs/minilm.yaml)")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=cmd_demo)

    presets = sub.add_parser("presets", help="list the model presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataValidationError, ModelNotAvailableError, FileNotFoundError) as err:
        print(f"uue {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
