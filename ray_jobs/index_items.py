"""Ray Data batch indexing job: encode statements with a checkpoint's item tower into vectors + an ANN index.

    ray job submit --working-dir . -- python -m ray_jobs.index_items \
        --checkpoint runs/minilm/model --input uue/data/sample_data --output runs/minilm/index \
        --config configs/minilm.yaml index.max_actors=4

The input is a data-contract folder (its `statements` table), or any .jsonl/.parquet file or folder of
shards with an id and a text column (--id-column/--text-column). The output folder is replaced only when
the new index is complete. Exit status: 0 on success, 2 on bad arguments, config, checkpoint or input.
"""

from __future__ import annotations

import argparse
import json
import sys

from uue.config import ConfigError, load_config
from uue.data.schema import DataValidationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.index_items", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="model folder (uue.json + item_tower/), a checkpoint holding model/, or an item tower")
    parser.add_argument("--input", required=True, help="statements: data-contract folder, table file or shard folder")
    parser.add_argument("--output", required=True, help="index folder (local or shared filesystem path)")
    parser.add_argument("--config", default=None, help="YAML config whose index: section is used (default: defaults)")
    parser.add_argument("--min-actors", type=int, default=None, help="overrides index.min_actors")
    parser.add_argument("--max-actors", type=int, default=None, help="overrides index.max_actors")
    parser.add_argument("--batch-size", type=int, default=None, help="overrides index.batch_size")
    parser.add_argument("--gpus-per-actor", type=float, default=None, help="overrides index.gpus_per_actor")
    parser.add_argument("--id-column", default=None, help="overrides index.id_column (non-contract tables)")
    parser.add_argument("--text-column", default=None, help="overrides index.text_column (non-contract tables)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. index.max_actors=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {"min_actors": args.min_actors, "max_actors": args.max_actors, "batch_size": args.batch_size,
             "gpus_per_actor": args.gpus_per_actor, "id_column": args.id_column, "text_column": args.text_column}
    overrides = list(args.overrides) + [f"index.{key}={value}" for key, value in flags.items() if value is not None]
    try:
        index = load_config(args.config, overrides).index
    except ConfigError as err:
        print(f"index_items: error: {err}", file=sys.stderr)
        return 2

    from uue.index.build import build_index

    try:
        manifest = build_index(
            args.checkpoint, args.input, args.output, min_actors=index.min_actors, max_actors=index.max_actors,
            batch_size=index.batch_size, gpus_per_actor=index.gpus_per_actor, id_column=index.id_column,
            text_column=index.text_column, cpus_per_actor=index.cpus_per_actor, dtype=index.dtype,
            rows_per_shard=index.rows_per_shard, connectivity=index.connectivity,
            expansion_search=index.expansion_search, attention=index.attention,
            compile_layers=index.compile_layers, pack_tokens=index.pack_tokens,
        )
    except (DataValidationError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"index_items: error: {err}", file=sys.stderr)
        return 2
    summary = {key: manifest[key] for key in ("version", "count", "dimension", "checkpoint_fingerprint")}
    print(f"index_items: wrote {args.output}: " + json.dumps({**summary, **manifest["build"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
