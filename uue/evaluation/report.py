"""OUT/report.md with PNG plots: score distributions, ROC curves, a 2-D map of users."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from uue.evaluation.metrics import roc_curve

HEADLINE = ("auc", "macro_auc", "mean_user_auc", "mean_statement_auc", "f1", "precision@10", "recall@10", "f1@10",
            "ndcg@10", "mrr@10", "ece")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def comparison_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(subset name, model metrics, baseline metrics) for overall, seen, zero-shot and each group."""
    baseline = result.get("baseline")
    rows = []
    for name in ("overall", "seen", "zero_shot"):
        if name in result:
            rows.append((name, result[name], baseline.get(name) if baseline else None))
    for group, values in result.get("groups", {}).items():
        rows.append((f"group: {group}", values, baseline["groups"].get(group) if baseline else None))
    return rows


def auc_gap(result: dict[str, Any], row_name: str) -> str:
    """'+0.031 [-0.004, +0.066]': the model's AUC minus the baseline's on one `comparison_rows` row, with its 95%
    interval over resampled users; '' without a baseline."""
    gaps = result.get("auc_versus_baseline")
    if not gaps:
        return ""
    gap = gaps["groups"].get(row_name.removeprefix("group: ")) if row_name.startswith("group: ") else gaps.get(row_name)
    if not gap or gap.get("difference") is None:
        return "-"
    low, high = gap.get("low"), gap.get("high")
    interval = f" [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else ""
    return f"{gap['difference']:+.3f}{interval}"


def _table(result: dict[str, Any], k: int) -> str:
    keys = [key.replace("@10", f"@{k}") for key in HEADLINE]
    gap_column = ["AUC - baseline [95%]"] if result.get("auc_versus_baseline") else []
    header = "| subset | labels | " + " | ".join(keys + gap_column) + " |"
    lines = [header, "|" + " --- |" * (len(keys) + len(gap_column) + 2)]
    for name, model, base in comparison_rows(result):
        cells = [f"{_fmt(model.get(key))}" + (f" ({_fmt(base.get(key))})" if base else "") for key in keys]
        cells += [auc_gap(result, name)] if gap_column else []
        lines.append(f"| {name} | {model.get('labels')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(out_dir: Path, arrays: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(arrays)
    # Score distributions: true vs false labels, one panel per embedder.
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        scored = arrays[name]["scored"]
        bins = np.linspace(scored.scores.min(), scored.scores.max(), 40) if len(scored) else 10
        ax.hist(scored.scores[scored.labels == 0], bins=bins, alpha=0.6, density=True, label="false (label 0)")
        ax.hist(scored.scores[scored.labels == 1], bins=bins, alpha=0.6, density=True, label="true (label 1)")
        ax.set_title(f"{name}: scores of test labels")
        ax.set_xlabel("cosine similarity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "score_distributions.png", dpi=110)
    plt.close(fig)
    written.append(("Score distributions", "score_distributions.png"))

    # ROC: overall, seen and zero-shot, model vs baseline.
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, selector) in zip(axes, (
        ("overall", lambda g: np.ones(len(g), dtype=bool)),
        ("seen statements", lambda g: np.array([not x.startswith("zero-shot") for x in g], dtype=bool)),
        ("zero-shot statements", lambda g: np.array([x.startswith("zero-shot") for x in g], dtype=bool)),
    ), strict=True):
        for name in names:
            scored = arrays[name]["scored"]
            mask = selector(scored.groups)
            if mask.any() and 0 < scored.labels[mask].sum() < mask.sum():
                fpr, tpr = roc_curve(scored.scores[mask], scored.labels[mask])
                ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(f"ROC: {title}")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    written.append(("ROC curves", "roc.png"))

    # 2-D map of users (PCA), coloured by the true statement of the group where most users have exactly one.
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        vectors = np.asarray(arrays[name]["user_vectors"], dtype=np.float64)
        if len(vectors) < 3:
            continue
        centred = vectors - vectors.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        colours = _user_colours(arrays[name])
        for value in sorted(set(colours)):
            idx = [i for i, c in enumerate(colours) if c == value]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=14, alpha=0.75, label=value)
        ax.set_title(f"{name}: users (PCA of user vectors)")
        ax.legend(fontsize=7, markerscale=1.2, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / "user_map.png", dpi=110)
    plt.close(fig)
    written.append(("2-D map of test users", "user_map.png"))
    return written


def _user_colours(arrays: dict[str, Any]) -> list[str]:
    scored = arrays["scored"]
    users = arrays["user_ids"]
    by_group: dict[str, dict[str, list[str]]] = {}
    for u, s, y, g in zip(scored.users, scored.statements, scored.labels, scored.groups, strict=True):
        if y == 1:
            by_group.setdefault(g, {}).setdefault(u, []).append(s)
    best_group, best_count = None, 0
    for group, per_user in by_group.items():
        count = sum(1 for v in per_user.values() if len(v) == 1)
        if count > best_count:
            best_group, best_count = group, count
    if best_group is None:
        return ["user"] * len(users)
    per_user = by_group[best_group]
    return [per_user[u][0] if len(per_user.get(u, [])) == 1 else "(other)" for u in users]


def write_report(out_dir: str | Path, result: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> Path:
    out_dir = Path(out_dir)
    k = result.get("k", 10)
    plots = _plots(out_dir, arrays)
    lines = [
        "# UUE evaluation report",
        "",
        f"- model: `{result['model_dir']}`",
        f"- data: `{result['data']}`, scored split: `{result.get('split')}`",
        f"- F1 threshold and calibration: {result['threshold']['source']}",
        "",
        "## Metrics (model, baseline in brackets)",
        "",
        "Baseline: " + (result.get("baseline", {}).get("description", "none")),
        "",
        _table(result, k),
        "",
        "`auc` pools every scored label; `macro_auc` (overall, seen, zero-shot) averages the groups' AUCs, so a",
        "family that is mostly true or mostly false does not decide it; `mean_user_auc` averages per-user AUCs;",
        "`mean_statement_auc` averages per-statement AUCs over users (which users a statement fits, whatever its",
        "base rate: a zero-shot statement's offset is a guess, its ranking of users is what transfers);",
        "retrieval metrics rank each subset's statement pool for every user with a true statement in it.",
        "`AUC - baseline [95%]`: the gap in pooled AUC with a 95% interval from resampling the scored users (both",
        "scored on each draw); an interval that spans 0 means these users cannot tell the two apart.",
        "",
        "## Embedding space",
        "",
        "| statistic | model | baseline |",
        "| --- | --- | --- |",
    ]
    base = result.get("baseline", {})
    for key, value in result.get("embedding_statistics", {}).items():
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(base.get('embedding_statistics', {}).get(key))} |")
    for key, value in result.get("user_similarity", {}).items():
        lines.append(f"| user similarity: {key} | {_fmt(value)} | {_fmt(base.get('user_similarity', {}).get(key))} |")
    lines += ["", "Do users with overlapping true statements sit closer? A positive Spearman correlation between",
              "the Jaccard overlap of two users' true statements and their cosine says yes.", ""]
    for title, file in plots:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    groups = Counter({g: v.get("labels", 0) for g, v in result.get("groups", {}).items()})
    if groups:
        lines += ["## Label groups", ""] + [f"- {g}: {n} labels" for g, n in groups.most_common()] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
