"""Evaluation: metric functions against independent brute-force computations, evaluate_model end to end
on the tiny preset (threshold from validation only, the no-split fallback, calibration), and `uue score`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from uue.cli import main
from uue.data.readers import load_dataset, write_dataset
from uue.evaluation import evaluate_model
from uue.evaluation.analysis import alignment, effective_rank, spearman, uniformity, user_similarity
from uue.evaluation.calibration import PlattCalibrator, calibrate_model
from uue.evaluation.metrics import (
    best_threshold,
    f1_at,
    mean_auc_within,
    paired_auc_difference,
    retrieval_metrics,
    roc_auc,
    roc_curve,
    weighted_roc_auc,
)


# ---------------------------------------------------------------------------------- metric functions
def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        labels = rng.integers(0, 2, size=40)
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == brute_force_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0


def test_roc_curve_area_is_the_auc():
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=200), rng.integers(0, 2, size=200)
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels))


def test_weighted_auc_is_the_auc_of_the_labels_repeated():
    rng = np.random.default_rng(2)
    for _ in range(10):
        scores = rng.integers(0, 5, size=60).astype(float)  # ties across repeated and distinct labels
        labels = rng.integers(0, 2, size=60)
        weights = rng.integers(0, 4, size=60)
        repeated = np.repeat(np.arange(60), weights)
        assert weighted_roc_auc(scores, labels, weights) == pytest.approx(roc_auc(scores[repeated], labels[repeated]))
        assert weighted_roc_auc(scores, labels, np.ones(60)) == pytest.approx(roc_auc(scores, labels))
    assert math.isnan(weighted_roc_auc([0.3, 0.1], [1, 0], [1, 0]))  # the negative drawn zero times


def _users_with_two_scorers(n_users: int, seed: int = 0):
    """Ten labels per user; `better` separates the classes more than `worse` does, and each user shifts all of
    their scores alike (what makes one user's labels move together)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 10)
    labels = rng.integers(0, 2, size=users.size)
    shift = rng.normal(size=n_users)[users]
    better = labels * 1.0 + shift + rng.normal(size=users.size)
    worse = labels * 0.5 + shift + rng.normal(size=users.size)
    return better, worse, labels, users


def test_paired_auc_difference_brackets_a_real_gain_and_narrows_with_more_users():
    better, worse, labels, users = _users_with_two_scorers(400)
    gap = paired_auc_difference(better, worse, labels, users, resamples=300)
    assert gap["difference"] == pytest.approx(roc_auc(better, labels) - roc_auc(worse, labels))
    assert 0 < gap["low"] <= gap["difference"] <= gap["high"]
    assert (gap["users"], gap["resamples"], gap["level"]) == (400, 300, 0.95)
    few = paired_auc_difference(*_users_with_two_scorers(40), resamples=300)
    assert few["high"] - few["low"] > gap["high"] - gap["low"]
    same = paired_auc_difference(worse, worse, labels, users, resamples=50)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    for resamples in (0, -5, 2.5):  # no draws gives no interval: refused with the reason, not NaN bounds
        with pytest.raises(ValueError, match="resamples is how many user draws"):
            paired_auc_difference(better, worse, labels, users, resamples=resamples)


def test_paired_auc_difference_resamples_users_not_labels():
    """Copying every label of every user three times changes no user's evidence: the same interval. Taking each
    label as its own user pretends the copies are independent: a narrower one."""
    better, worse, labels, users = _users_with_two_scorers(60, seed=1)
    copies = np.tile(np.arange(len(labels)), 3)
    once = paired_auc_difference(better, worse, labels, users, resamples=200)
    thrice = paired_auc_difference(better[copies], worse[copies], labels[copies], users[copies], resamples=200)
    assert (thrice["low"], thrice["high"]) == pytest.approx((once["low"], once["high"]))
    per_label = paired_auc_difference(better[copies], worse[copies], labels[copies], np.arange(len(copies)),
                                      resamples=200)
    assert per_label["high"] - per_label["low"] < 0.7 * (once["high"] - once["low"])
    with pytest.raises(ValueError, match="one entry per label"):
        paired_auc_difference(better, worse[:-1], labels, users)
    with pytest.raises(ValueError, match="level"):
        paired_auc_difference(better, worse, labels, users, level=95)


def test_mean_auc_within_averages_keys_with_both_classes():
    scores = np.array([0.9, 0.8, 0.2, 0.1, 0.5, 0.4])
    labels = np.array([1, 0, 0, 1, 1, 1])
    users = np.array(["a", "b", "a", "b", "c", "c"], dtype=object)  # a: perfect, b: inverted, c: one class only
    value, counted = mean_auc_within(scores, labels, users)
    assert (value, counted) == (0.5, 2)


def test_mean_statement_auc_ignores_each_statements_offset():
    # Each statement ranks its users perfectly, but the rarely true statement scores above the mostly true one:
    # the pooled AUC counts that against the model, the per-statement mean does not.
    rng = np.random.default_rng(3)
    rare = rng.random(100) < 0.2
    common = rng.random(100) < 0.8
    scores = np.concatenate([5.0 + rare, 0.0 + common])
    labels = np.concatenate([rare, common]).astype(int)
    statements = np.array(["rare"] * 100 + ["common"] * 100, dtype=object)
    assert mean_auc_within(scores, labels, statements) == (1.0, 2)
    assert roc_auc(scores, labels) < 0.5


def test_best_threshold_maximises_f1_over_every_cut():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=60).round(1), rng.integers(0, 2, size=60)
    chosen = best_threshold(scores, labels)
    best_f1 = max(f1_at(scores, labels, t)["f1"] for t in np.unique(scores))
    assert f1_at(scores, labels, chosen)["f1"] == pytest.approx(best_f1)


def test_f1_at_a_threshold_by_hand():
    result = f1_at([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0], threshold=0.5)  # tp=1 fp=1 fn=1
    assert result == {"f1": 0.5, "precision": 0.5, "recall": 0.5}


def test_retrieval_metrics_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    relevant = np.array([[False, True, False, True], [True, False, False, False], [False, False, False, False]])
    got = retrieval_metrics(scores, relevant, k=2)
    # row 0: top-2 = [0, 1], one hit at rank 2 of 2 relevant; row 1: top-2 = [3, 2], no hit; row 2 skipped.
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert got["users"] == 2
    assert got["precision@2"] == pytest.approx((0.5 + 0) / 2)
    assert got["recall@2"] == pytest.approx((0.5 + 0) / 2)
    assert got["f1@2"] == pytest.approx((0.5 + 0) / 2)
    assert got["ndcg@2"] == pytest.approx(ndcg0 / 2)
    assert got["mrr@2"] == pytest.approx(0.5 / 2)


def test_embedding_statistics_on_known_geometry():
    eye = np.eye(4)
    assert effective_rank(eye) == pytest.approx(4.0)
    assert effective_rank(np.outer(np.ones(5), [1.0, 2.0, 0.0])) == pytest.approx(1.0)
    assert alignment(eye, eye) == pytest.approx(0.0)
    assert alignment(eye[:2], -eye[:2]) == pytest.approx(4.0)
    # Orthonormal vectors: every pair at squared distance 2, so uniformity = -2 * 2.
    assert uniformity(eye) == pytest.approx(-4.0)
    assert uniformity(np.ones((3, 4))) == pytest.approx(0.0)  # collapsed


def test_spearman_and_user_similarity():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # Users 0/1 share their truths and point the same way; user 2 shares nothing and is orthogonal.
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    result = user_similarity(vectors, [{"x", "y"}, {"x", "y"}, {"z"}])
    assert result["pairs"] == 3
    assert result["spearman_overlap_vs_cosine"] > 0.8
    assert result["mean_cosine_top_quartile_overlap"] > result["mean_cosine_bottom_quartile_overlap"]


# ---------------------------------------------------------------------------------- end to end (tiny)
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, sample_data_dir) -> Path:
    from uue.config import load_config
    from uue.train import UUETrainer

    out = tmp_path_factory.mktemp("tiny_run")
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml",
                         [f"data.path={sample_data_dir}", f"training.output_dir={out}", "training.max_steps=4",
                          "training.progress_bar=false"])
    result = UUETrainer(config).fit()
    assert result.model_dir is not None
    return result.model_dir


def test_evaluate_model_writes_metrics_report_and_plots(tiny_model_dir, sample_data_dir, tmp_path):
    result = evaluate_model(tiny_model_dir, sample_data_dir, tmp_path, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == result
    dataset = load_dataset(sample_data_dir)
    test_labels = dataset.labels_in("test")
    for block in (result, result["baseline"]):
        assert block["overall"]["labels"] == len(test_labels)
        assert set(block["groups"]) == {lab.group for lab in test_labels}
        for key in ("auc", "mean_user_auc", "f1", "precision@10", "recall@10", "f1@10", "ndcg@10", "mrr@10"):
            assert 0.0 <= block["overall"][key] <= 1.0, key
        assert 0.0 <= block["ece"] <= 1.0
        group_aucs = [g["auc"] for g in block["groups"].values() if g["auc"] is not None]
        assert block["overall"]["macro_auc"] == pytest.approx(float(np.mean(group_aucs)))
        assert set(block["embedding_statistics"]) >= {"alignment", "uniformity_users", "effective_rank_users"}
        assert block["user_similarity"]["pairs"] == math.comb(block["overall"]["users"], 2)
    assert result["threshold"]["source"] == "'validation' labels"
    gaps = result["auc_versus_baseline"]
    subsets = [(result[n], result["baseline"][n], gaps[n]) for n in ("overall", "seen", "zero_shot") if n in result]
    subsets += [(result["groups"][g], result["baseline"]["groups"][g], gaps["groups"][g]) for g in result["groups"]]
    assert len(subsets) >= 3
    for block, base, gap in subsets:
        if block["auc"] is None or base["auc"] is None:
            assert gap["difference"] is None
            continue
        assert gap["difference"] == pytest.approx(block["auc"] - base["auc"])
        assert gap["low"] <= gap["difference"] <= gap["high"]
        assert gap["users"] == block["users"]
    report = (tmp_path / "report.md").read_text()
    assert "| overall |" in report
    assert "AUC - baseline [95%]" in report
    overall = gaps["overall"]
    overall_gap = f"{overall['difference']:+.3f} [{overall['low']:+.3f}, {overall['high']:+.3f}]"
    assert overall_gap in next(line for line in report.splitlines() if line.startswith("| overall |"))
    for png in ("score_distributions.png", "roc.png", "user_map.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_threshold_never_depends_on_the_scored_labels(tiny_model_dir, sample_data_dir, tmp_path):
    """Flipping every test label flips AUC to 1 - AUC but leaves the validation-chosen threshold alone."""
    dataset = load_dataset(sample_data_dir)
    for lab in dataset.labels:
        if lab.split == "test":
            lab.label = 1 - lab.label
    flipped_dir = write_dataset(tmp_path / "flipped", dataset)
    original = evaluate_model(tiny_model_dir, sample_data_dir, tmp_path / "a", baseline=False, report=False,
                              progress=False)
    flipped = evaluate_model(tiny_model_dir, flipped_dir, tmp_path / "b", baseline=False, report=False,
                             progress=False)
    assert flipped["overall"]["threshold"] == original["overall"]["threshold"]
    assert flipped["overall"]["auc"] == pytest.approx(1.0 - original["overall"]["auc"])


def test_folder_without_splits_tunes_on_half_the_users_and_scores_the_other(tiny_model_dir, sample_data_dir,
                                                                           tmp_path):
    dataset = load_dataset(sample_data_dir)
    for lab in dataset.labels:
        lab.split = None
    folder = write_dataset(tmp_path / "nosplit", dataset)
    result = evaluate_model(tiny_model_dir, folder, tmp_path / "out", baseline=False, report=False, progress=False)
    assert "random half" in result["threshold"]["source"]
    users = {lab.user_id for lab in dataset.labels}
    assert result["threshold"]["users"] == len(users) // 2
    assert result["overall"]["users"] == len(users) - len(users) // 2
    assert result["split"] is None


def test_calibrate_model_is_used_by_evaluation_and_score_cli(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    calibrator = calibrate_model(tiny_model_dir, sample_data_dir)
    assert calibrator is not None and calibrator.fitted_on == len(load_dataset(sample_data_dir).labels_in("validation"))
    assert PlattCalibrator.load(tiny_model_dir) == calibrator
    result = evaluate_model(tiny_model_dir, sample_data_dir, tmp_path, baseline=False, report=False, progress=False)
    assert result["calibration"]["source"] == "model folder (calibration.json)"

    from uue.model.inference import UUEInference

    dataset = load_dataset(sample_data_dir)
    user = dataset.users[sorted(dataset.users)[0]]
    user_file = tmp_path / "user.json"
    user_file.write_text(json.dumps({"user_id": user.user_id, "chunks": [{"text": c.text} for c in user.chunks]}))
    statements = ["enjoys long mountain hikes", "a statement never seen in training"]
    argv = ["score", "--checkpoint", str(tiny_model_dir), "--user", str(user_file)]
    for text in statements:
        argv += ["--statement", text]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    inference = UUEInference(tiny_model_dir)
    for line, text in zip(lines, statements, strict=True):
        expected = inference.compute_similarity([c.text for c in user.chunks], text)
        assert line["statement"] == text
        assert line["similarity"] == pytest.approx(expected, abs=1e-5)
        assert line["probability"] == pytest.approx(float(calibrator.predict(line["similarity"])), abs=1e-5)
    # A bad checkpoint is a clear error, not a traceback.
    assert main(["score", "--checkpoint", str(tmp_path / "missing"), "--user", str(user_file),
                 "--statement", "x"]) == 2
    assert "not a UUE model folder" in capsys.readouterr().err


def test_evaluate_cli_prints_model_and_baseline(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    checkpoint_parent = Path(tiny_model_dir).parent  # the training output_dir: resolves to its model/
    assert main(["evaluate", "--checkpoint", str(checkpoint_parent), "--data", str(sample_data_dir),
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert f"{metrics['overall']['auc']:.3f} / {metrics['baseline']['overall']['auc']:.3f}" in overall
    assert f"{metrics['auc_versus_baseline']['overall']['difference']:+.3f} [" in overall



def test_identity_projection_on_frozen_backbones_is_the_baseline(tiny_model_config, sample_data_dir, tmp_path):
    """projection_init=identity + mean pooling: the untrained model and the baseline score every label alike."""
    from uue.model.backbone import TINY_HIDDEN
    from uue.model.uue_model import UUEModel

    config = tiny_model_config.model_copy(update={
        "embedding_dim": TINY_HIDDEN, "projection_init": "identity", "use_attention_pooling": False,
        "freeze_user_backbone": True, "freeze_item_backbone": True})
    model_dir = UUEModel.from_config(config, seed=0).save_pretrained(tmp_path / "model")
    result = evaluate_model(model_dir, sample_data_dir, tmp_path / "eval", report=False, progress=False)
    for key in ("auc", "mean_user_auc", "f1", "ndcg@10", "mrr@10", "threshold"):
        assert result["overall"][key] == pytest.approx(result["baseline"]["overall"][key], abs=1e-5), key
