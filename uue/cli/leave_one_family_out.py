"""Leave-one-family-out: how well a trained model answers a whole kind of statement it never saw.

For each statement family of MovieLens (genre, occupation, age, gender, film) in turn, the data is converted with
that family held out of training altogether (`MovieLensOptions.hold_out_families`: no training label names it,
and with genres held out no film text names a genre either), the configured model is trained on the rest, and
the held-out family is scored on the chosen split's users beside the untrained baseline. The average over
families says whether training adds to what the pretrained space knows about new kinds of statement or takes
from it.

`uue study leave-one-family-out --variant 1m --config configs/movielens-1m-minilm.yaml --split validation
--out runs/lofo` writes, under OUT: one folder per family (data/, model/, eval-<split>/), `lofo.json`, `lofo.md`
(the table), `lofo.png` (trained vs baseline per family) and `config.yaml`, the config as read when the study
started, which every family trains on (an edit to the file while the study runs changes nothing). A family whose
evaluation is already there for the same config and overrides is read back, not trained again, so a stopped study
continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uue.config import load_config
from uue.data.movielens import FAMILIES, MovieLensOptions, write_movielens

RESULT_FILE = "lofo.json"


def _study_key(config_path: str, overrides: Sequence[str], variant: str, split: str) -> str:
    """What decides a family's result: the config file's text, the overrides, the variant and the split."""
    text = Path(config_path).read_text()
    return hashlib.sha256(json.dumps([text, list(overrides), variant, split]).encode()).hexdigest()[:16]


def _family_row(family: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Trained vs baseline AUC of the held-out family's group (pooled, and per statement: which users each
    statement fits, whatever its base rate), and of the statements that were trained on."""
    group = f"zero-shot {family}"
    mine, base = metrics["groups"].get(group), metrics["baseline"]["groups"].get(group)
    if mine is None or base is None:
        raise ValueError(f"the evaluation has no group {group!r}: was the data converted with {family} held out?")
    return {
        "family": family, "labels": mine["labels"], "positives": mine["positives"],
        "auc": mine["auc"], "baseline_auc": base["auc"],
        # evaluations written before the per-statement AUC existed read back as NaN
        "statement_auc": mine.get("mean_statement_auc", math.nan),
        "baseline_statement_auc": base.get("mean_statement_auc", math.nan),
        "seen_auc": metrics["seen"]["auc"], "seen_baseline_auc": metrics["baseline"]["seen"]["auc"],
    }


def run_family(family: str, config_path: str, overrides: Sequence[str], variant: str, split: str,
               out_dir: Path, key: str) -> dict[str, Any]:
    """Convert with `family` held out, train, evaluate; the row of the study (read back when already done)."""
    from uue.evaluation import evaluate_model
    from uue.train import UUETrainer

    folder = out_dir / family
    eval_dir = folder / f"eval-{split}"
    done = folder / "lofo-row.json"
    if done.is_file() and (eval_dir / "metrics.json").is_file():
        saved = json.loads(done.read_text())
        if saved.get("key") == key:
            print(f"[{family}] already evaluated for this config: {done}")
            return _family_row(family, json.loads((eval_dir / "metrics.json").read_text()))
    data_dir = folder / "data"
    config = load_config(config_path, [*overrides, f"data.path={data_dir}", f"training.output_dir={folder}"])
    options = MovieLensOptions(variant=variant, max_chunk_length=config.model.max_chunk_length,
                               tokenizer=config.model.user_model_name, hold_out_families=(family,))
    summary = write_movielens(data_dir, options, progress=False)
    print(f"[{family}] held out: {summary['labels_by_group'].get(f'zero-shot {family}', 0)} labels, "
          f"{summary['zero_shot_labels_of_train_users_left_out']} training labels left out; training")
    trainer = UUETrainer(config)
    result = trainer.fit()
    metrics = evaluate_model(result.model_dir, trainer.dataset, eval_dir, split=split, report=False, progress=False)
    row = _family_row(family, metrics)
    done.write_text(json.dumps({"key": key, "row": row}, indent=2))
    print(f"[{family}] AUC {row['auc']:.3f} vs baseline {row['baseline_auc']:.3f} "
          f"(seen {row['seen_auc']:.3f} vs {row['seen_baseline_auc']:.3f})")
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows plus their mean (trained, baseline, difference) over families."""
    def mean(key: str) -> float:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    trained, baseline = mean("auc"), mean("baseline_auc")
    return {"families": rows, "mean_auc": trained, "mean_baseline_auc": baseline, "mean_gain": trained - baseline,
            "mean_statement_auc": mean("statement_auc"), "mean_baseline_statement_auc": mean("baseline_statement_auc")}


def markdown_table(summary: dict[str, Any]) -> str:
    """The study's table: pooled AUC of each held-out family, its per-statement AUC, and the seen statements'."""
    lines = ["| held-out family | labels | positives | AUC trained | baseline | gain | per-statement AUC trained | "
             "baseline | seen AUC trained | baseline |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["families"]:
        lines.append(f"| {r['family']} | {r['labels']:,} | {r['positives']:,} | {r['auc']:.3f} | "
                     f"{r['baseline_auc']:.3f} | {r['auc'] - r['baseline_auc']:+.3f} | {r['statement_auc']:.3f} | "
                     f"{r['baseline_statement_auc']:.3f} | {r['seen_auc']:.3f} | {r['seen_baseline_auc']:.3f} |")
    lines.append(f"| **mean** | | | **{summary['mean_auc']:.3f}** | {summary['mean_baseline_auc']:.3f} | "
                 f"**{summary['mean_gain']:+.3f}** | **{summary['mean_statement_auc']:.3f}** | "
                 f"{summary['mean_baseline_statement_auc']:.3f} | | |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary["families"]
    x = np.arange(len(rows) + 1)
    trained = [r["auc"] for r in rows] + [summary["mean_auc"]]
    base = [r["baseline_auc"] for r in rows] + [summary["mean_baseline_auc"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(x) + 2, 3.6))
    ax.bar(x - 0.2, base, 0.4, label="untrained baseline", color="#9aa5b1")
    ax.bar(x + 0.2, trained, 0.4, label="trained without the family", color="#2f6db3")
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, [r["family"] for r in rows] + ["mean"])
    ax.set_ylabel("AUC of the held-out family")
    ax.set_ylim(0.3, 1.0)
    ax.set_title("Leave one statement family out of training")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_leave_one_family_out(config_path: str, overrides: Sequence[str] = (), variant: str = "1m",
                             families: Sequence[str] = FAMILIES, split: str = "validation",
                             out_dir: str | Path = "runs/lofo") -> dict[str, Any]:
    """The whole study; returns what lofo.json holds."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be some of {', '.join(FAMILIES)}; got {list(families)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Read once: every family trains on the config as it was when the study started (a study runs for hours, and
    # an edit to the file meanwhile would otherwise mix configs or stop it at the next family).
    snapshot = out_dir / "config.yaml"
    snapshot.write_text(Path(config_path).read_text())
    key = _study_key(str(snapshot), overrides, variant, split)
    rows = [run_family(f, str(snapshot), overrides, variant, split, out_dir, key) for f in families]
    summary = {"config": str(config_path), "overrides": list(overrides), "variant": variant, "split": split,
               **summarize(rows)}
    (out_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary)
    (out_dir / "lofo.md").write_text(f"Leave-one-family-out, {split} users of MovieLens-{variant.upper()}, config "
                                     f"`{config_path}` {' '.join(overrides)}\n\n{table}\n")
    plot(summary, out_dir / "lofo.png")
    print(table)
    print(f"study: {out_dir / RESULT_FILE}, {out_dir / 'lofo.md'}, {out_dir / 'lofo.png'}")
    return summary
