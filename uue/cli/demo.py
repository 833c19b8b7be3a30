"""`make demo` / `uue demo`: the five steps on MovieLens with the CPU default (MiniLM towers).

`make demo` runs MovieLens-100K (configs/movielens-minilm.yaml); `uue demo --variant 1m --config
configs/movielens-1m-minilm.yaml` runs the same steps on MovieLens-1M, and `--split validation` scores the
validation users instead of the test users (to choose options without looking at the test users).

1. train the configured model (configs/movielens-minilm.yaml: frozen, cached user backbone; top item
   layers) on MovieLens-100K converted to the data contract (converted first when the folder is empty);
2. evaluate it on the test users beside the untrained-backbone baseline (metrics.json, report.md, PNGs);
3. inference for a few test users: their top statements with similarity and calibrated probability;
4. statement-statement similarity, including statements never seen in training;
5. the report, and a side-by-side table of trained vs baseline test AUC and NDCG@10.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from uue.config import REPO_ROOT, load_config
from uue.data.movielens import MovieLensOptions, write_movielens
from uue.data.schema import Statement
from uue.evaluation import evaluate_model
from uue.evaluation.calibration import calibrate_model
from uue.evaluation.report import auc_gap, comparison_rows
from uue.model.encode import ModelEmbedder
from uue.train import UUETrainer

DEFAULT_CONFIG = REPO_ROOT / "configs" / "movielens-minilm.yaml"
NOVEL_STATEMENTS = ("would enjoy a space opera", "likes cowboy films", "prefers light-hearted family films")


def _backbone_training(config, tower: str) -> str:
    """How a tower's backbone trains, in words (frozen + cached, top N blocks, all blocks)."""
    m = config.model
    frozen = m.towers.freeze_user_backbone if tower == "user" else m.towers.freeze_item_backbone
    cached = m.caching.cache_chunk_vectors if tower == "user" else m.caching.cache_statement_vectors
    layers = m.towers.user_trainable_layers if tower == "user" else m.towers.item_trainable_layers
    if frozen:
        return "frozen" + (", its vectors cached" if cached else "")
    if layers:
        cut = ", lower blocks cached at the cut" if m.hidden_cache_layers(tower) else ""
        return f"top {layers} blocks train{cut}"
    return "all blocks train"


def _step(number: int, text: str, started: float) -> None:
    print(f"\n[{number}/5] {text}  (t={time.perf_counter() - started:.0f}s)", flush=True)


def ensure_movielens(data_dir: Path, max_chunk_length: int, tokenizer: str, variant: str = "100k") -> None:
    """Convert MovieLens (`variant`) into data_dir unless it holds data already.

    A folder converted earlier with other settings is converted again; a folder of other data (no
    movielens.json beside its tables) is used as it is, never overwritten.
    """
    summary_file = data_dir / "movielens.json"
    if summary_file.is_file():
        options = json.loads(summary_file.read_text()).get("options", {})
        if (options.get("max_chunk_length") == max_chunk_length and options.get("tokenizer") == tokenizer
                and options.get("variant", "100k") == variant and options.get("eval_phrasing")):
            kept = options.get("max_history") or "all"  # a deliberate --max-history is used as converted
            per_chunk = options.get("ratings_per_chunk") or "as many as fit"
            print(f"      using the converted MovieLens data in {data_dir} ({kept} history ratings per user, "
                  f"{per_chunk} per chunk)")
            return
    elif any(data_dir.glob("users*")):
        print(f"      using the data in {data_dir} (not MovieLens)")
        return
    summary = write_movielens(data_dir, MovieLensOptions(variant=variant, max_chunk_length=max_chunk_length,
                                                         tokenizer=tokenizer))
    print(f"      converted MovieLens-{variant.upper()} -> {data_dir}: {summary['users']} users "
          f"{summary['users_by_split']}, {summary['statements']} statements, {summary['labels']} labels; "
          f"positives per zero-shot group on test users: {summary['test_positives_by_zero_shot_group']}")


def print_comparison(result: dict, k: int = 10) -> None:
    print(f"      {'test subset':26s} {'labels':>7s}   {'AUC trained':>11s} {'baseline':>9s}   "
          f"{'AUC gap [95%, users resampled]':>30s}   {f'NDCG@{k} trained':>15s} {'baseline':>9s}")
    for name, model, base in comparison_rows(result):
        def cell(block: dict | None, key: str) -> str:
            value = None if block is None else block.get(key)
            return "-" if value is None else f"{value:.3f}"
        print(f"      {name:26s} {model['labels']:7d}   {cell(model, 'auc'):>11s} {cell(base, 'auc'):>9s}   "
              f"{auc_gap(result, name):>30s}   {cell(model, f'ndcg@{k}'):>15s} {cell(base, f'ndcg@{k}'):>9s}")


def run_demo(config_path: str | None = None, overrides: list[str] | None = None, variant: str = "100k",
             split: str = "test") -> dict:
    started = time.perf_counter()
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    data_dir = Path(config.data.path)
    output_dir = Path(config.training.output_dir)
    towers = config.model.towers
    _step(1, f"train {towers.user_model_name}/{towers.item_model_name} towers on {data_dir}", started)
    print(f"      user backbone: {_backbone_training(config, 'user')}; "
          f"item backbone: {_backbone_training(config, 'item')}")
    ensure_movielens(data_dir, towers.max_chunk_length, towers.user_model_name, variant)
    trainer = UUETrainer(config)
    trained_from = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - trained_from
    history = result.history
    print(f"      {result.steps} steps in {train_seconds:.0f} s, loss {history[0]['loss']:.3f} -> "
          f"{history[-1]['loss']:.3f}; model: {result.model_dir}")
    cache_dir = config.model.caching.cache_dir
    calibrator = calibrate_model(result.model_dir, trainer.dataset, config.data.validation_split, cache_dir=cache_dir)

    _step(2, f"evaluate on {split} users, beside the untrained backbones with mean pooling", started)
    eval_dir = output_dir / ("eval" if split == "test" else f"eval-{split}")
    metrics = evaluate_model(result.model_dir, trainer.dataset, eval_dir, split=split, cache_dir=cache_dir)
    timing = {"setup_and_train_seconds": trained_from - started + train_seconds, "train_loop_seconds": train_seconds,
              "steps": result.steps}
    (eval_dir / "timing.json").write_text(json.dumps(timing))  # beside metrics.json: what the training cost
    dataset = trainer.dataset

    _step(3, "inference: top statements for a few test users", started)
    embedder = ModelEmbedder(trainer.model, trainer.device, progress=False, cache_dir=cache_dir)
    statement_ids = sorted(dataset.statements)
    statement_vectors = embedder.statements([dataset.statements[s] for s in statement_ids])
    test_users = sorted({lab.user_id for lab in dataset.labels_in(split)}, key=lambda u: (len(u), u))[:3]
    user_vectors = embedder.users([dataset.users[u] for u in test_users])
    truth = {(lab.user_id, lab.statement_id): lab.label for lab in dataset.labels_in(split)}
    for user_id, vector in zip(test_users, user_vectors, strict=True):
        latest = dataset.users[user_id].chunks[-1].text.splitlines()[-1]
        print(f"      user {user_id} (latest history line: {latest!r})")
        scores = statement_vectors @ vector
        for index in np.argsort(-scores)[:5]:
            sid = statement_ids[index]
            known = {1: "true", 0: "false"}.get(truth.get((user_id, sid), -1), "unlabelled")
            probability = f"p={float(calibrator.predict(scores[index])):.2f}" if calibrator else ""
            print(f"        {scores[index]:+.3f} {probability}  {dataset.statements[sid].text!r} ({known})")

    _step(4, "statement-statement similarity (item tower), including never-trained statements", started)
    # Every evaluation-phrasing statement except the per-film ones (hundreds of titles would drown the tastes).
    probes = [dataset.statements[s] for s in statement_ids if not s.startswith("film:") and "#t" not in s]
    texts = [s.text for s in probes]
    novel = [Statement(statement_id=f"novel:{i}", text=t) for i, t in enumerate(NOVEL_STATEMENTS)]
    probe_vectors = embedder.statements(probes)
    novel_vectors = embedder.statements(novel)
    for text, vector in zip(NOVEL_STATEMENTS, novel_vectors, strict=True):
        similar = probe_vectors @ vector
        nearest = ", ".join(f"{texts[i]!r} {similar[i]:+.2f}" for i in np.argsort(-similar)[:3])
        print(f"      {text!r} ~ {nearest}")
    genre_vectors = {s.statement_id: (s.text, v) for s, v in zip(probes, probe_vectors, strict=True)}
    if "genre:sci-fi" in genre_vectors and "genre:war" in genre_vectors:
        (a_text, a), (b_text, b) = genre_vectors["genre:sci-fi"], genre_vectors["genre:war"]
        print(f"      {a_text!r} ~ {b_text!r} {float(a @ b):+.2f} (both zero-shot)")

    _step(5, f"report: {eval_dir / 'report.md'}", started)
    print_comparison(metrics)
    for subset in ("seen", "zero_shot"):
        if subset not in metrics or subset not in metrics.get("baseline", {}):
            continue
        parts = []
        for key in ("auc", "macro_auc", "ndcg@10"):
            mine, base = metrics[subset].get(key), metrics["baseline"][subset].get(key)
            if mine is not None and base is not None:
                verdict = ("same to 3 decimals" if round(mine, 3) == round(base, 3)
                           else "better" if mine > base else "NOT better")
                parts.append(f"{key} {mine:.3f} vs {base:.3f} ({verdict})")
        print(f"      {subset}, trained vs baseline: " + ", ".join(parts))
    if metrics.get("ece") is not None:
        print(f"      calibration error on {split} users (ECE): {metrics['ece']:.3f}")
    print(f"      metrics: {eval_dir / 'metrics.json'}; plots: {eval_dir}/*.png")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return metrics

