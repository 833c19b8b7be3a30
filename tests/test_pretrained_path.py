"""The pretrained path (uue.model.pretrained_path): the gate, the fit after training, the saved folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uue.config import ConfigError, ExperimentConfig, load_config
from uue.model.backbone import TINY_HIDDEN
from uue.model.pretrained_path import StatementPretrainedPath, UserPretrainedPath

FROZEN = ["model.freeze_user_backbone=true", "model.freeze_item_backbone=true", "model.cache_chunk_vectors=true",
          "model.cache_statement_vectors=true", "model.use_attention_pooling=false"]


def test_config_needs_frozen_backbones_mean_pooling_and_one_backbone():
    with pytest.raises(ConfigError, match="pretrained_path_weight needs freeze_user_backbone"):
        load_config("configs/tiny.yaml", ["model.pretrained_path_weight=1"])
    with pytest.raises(ConfigError, match="needs mean pooling"):
        load_config("configs/tiny.yaml", [*FROZEN[:4], "model.pretrained_path_weight=1"])
    with pytest.raises(ConfigError, match="one backbone for both towers"):
        load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1", "model.item_model_name=tiny-item"])
    with pytest.raises(ConfigError, match="user_pooling 'affinity' reads history chunks with the item head"):
        load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1", "model.user_pooling=affinity",
                                          "model.use_item_metadata=true"])
    assert load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1"]).model.pretrained_path \
        .pretrained_path_weight == 1
    assert load_config("configs/tiny.yaml", ["model.novel_trained_share=0.5"]).model.pretrained_path \
        .novel_trained_share == 0.5
    assert load_config("configs/tiny.yaml", ["model.predicted_content_weight=2"]).model.pretrained_path \
        .predicted_content_weight == 2
    with pytest.raises(ConfigError, match="predicted_content_weight"):
        load_config("configs/tiny.yaml", ["model.predicted_content_weight=-1"])
    with pytest.raises(ConfigError, match="novel_trained_share"):
        load_config("configs/tiny.yaml", ["model.novel_trained_share=1.5"])
    assert load_config("configs/tiny.yaml", ["model.user_fallback_threshold=0.4"]).model.pretrained_path \
        .user_fallback_threshold == 0.4
    with pytest.raises(ConfigError, match="user_fallback_threshold"):
        load_config("configs/tiny.yaml", ["model.user_fallback_threshold=2"])


def test_gates_keep_trained_statements_and_open_for_new_ones():
    bank = torch.eye(4)[:2]  # two training statements
    trained_mean = torch.tensor([0.3, -0.1])
    path = StatementPretrainedPath(bank, trained_mean, threshold=0.35, offset_threshold=0.5, sharpness=0.01)
    trained = F.normalize(torch.tensor([[1.0, 2.0], [2.0, -1.0], [0.5, 0.5], [1.0, 0.0]]), dim=-1)
    pooled = torch.tensor([[3.0, 0.0, 0.0, 0.0],  # a training statement: novelty 0
                           [1.0, 1.0, 0.0, 0.0],  # between the two: novelty 1 - cos 45 degrees = 0.29
                           [0.0, 0.0, 2.0, 0.0],  # orthogonal to both: novelty 1
                           [1.0, 0.0, 1.0, 0.0]])  # cos 45 degrees to one: novelty 0.29
    novelty = path.novelty(F.normalize(pooled, dim=-1))
    torch.testing.assert_close(novelty, torch.tensor([0.0, 1 - 0.5**0.5, 1.0, 1 - 0.5**0.5]))
    gate = path.gate(F.normalize(pooled, dim=-1))
    assert gate[0] < 1e-6 and gate[1] < 0.01 and gate[2] > 1 - 1e-6
    # A wider sigmoid (novelty_sharpness) half-opens the gate for the statement between the two (0.29 vs 0.35).
    options = load_config("configs/tiny.yaml", ["model.novelty_sharpness=0.1"]).model.pretrained_path
    softer = StatementPretrainedPath(bank, trained_mean, threshold=0.35, offset_threshold=0.5,
                                     sharpness=options.novelty_sharpness).gate(F.normalize(pooled, dim=-1))
    assert 0.3 < float(softer[1]) < 0.4 and float(softer[0]) < 0.05
    out = path(trained, pooled)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))  # statement vectors stay unit
    # Near the training statements: the trained vector, no path, the offset kept (its column 0).
    torch.testing.assert_close(out[0], torch.cat([trained[0], torch.zeros(5)]), atol=1e-5, rtol=0)
    # Far from all of them: the pretrained vector beside the trained one, and the trained offset taken back.
    offset = float(trained[2] @ trained_mean)
    expected = torch.cat([trained[2], torch.tensor([0.0, 0.0, 1.0, 0.0, -offset])])
    torch.testing.assert_close(out[2], expected / expected.norm())
    # Scored against a user vector [trained, content part, 1]: the training users' mean user scores 0 on it.
    mean_user = torch.cat([trained_mean, torch.zeros(4), torch.ones(1)])
    assert abs(float(mean_user @ out[2])) < 1e-6 and float(mean_user @ out[3]) > 0.29  # kept: 0.3
    # offset_novelty_threshold=2 keeps every trained offset.
    keep = StatementPretrainedPath(bank, trained_mean, threshold=0.35, offset_threshold=2.0, sharpness=0.01)
    assert abs(float(keep(trained, pooled)[2, -1])) < 1e-6
    # trained_share 0.5: the new statement keeps half its trained ranking, the path and the offset columns and the
    # divisor as at share 1; the training statement keeps all of it.
    half = StatementPretrainedPath(bank, trained_mean, threshold=0.35, offset_threshold=0.5, sharpness=0.01,
                                   trained_share=0.5)(trained, pooled)
    torch.testing.assert_close(half[2], torch.cat([0.5 * out[2, :2], out[2, 2:]]))
    torch.testing.assert_close(half[0], out[0])
    assert float(half[2].norm()) < 1.0


def test_user_side_adds_the_centred_content_at_the_fitted_scale_and_a_constant():
    path = UserPretrainedPath(mean=torch.tensor([0.5, 0.5, 0.0]), scale=2.0)
    # one user, two real chunks and a padding row: the content is the unit mean of the real ones
    chunks = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    out = path(torch.tensor([[1.0, 0.0]]), chunks, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.0, 1.0]]))
    # A content map adds the centred content the trained vector predicts: [1, 0] @ map = [0, 0.5, 0] here.
    mapped = UserPretrainedPath(mean=torch.tensor([0.5, 0.5, 0.0]), scale=2.0,
                                content_map=torch.tensor([[0.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
    out = mapped(torch.tensor([[1.0, 0.0]]), chunks, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]))


def test_users_unlike_every_training_user_are_scored_by_the_untrained_baseline():
    """The user gate: a user whose mean content is near the training users' mean keeps the path's vector (and a
    zero block); one far from it gets only scale x its mean content, which the statement side's unscaled e(x) turns
    into the untrained baseline's score, for a statement near the trained ones as much as for a new one."""
    mean, scale = torch.tensor([1.0, 0.0, 0.0]), 2.0
    plain = UserPretrainedPath(mean, scale)
    gated = UserPretrainedPath(mean, scale, fallback_threshold=0.4, fallback_sharpness=0.01)
    assert (plain.width, gated.width) == (4, 7)
    chunks = torch.tensor([[[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]],  # a training-like user: novelty 0
                           [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # unlike them: novelty 1
    mask = torch.ones(2, 2, dtype=torch.bool)
    trained = F.normalize(torch.tensor([[1.0, 1.0], [1.0, -2.0]]), dim=-1)
    torch.testing.assert_close(gated.user_novelty(chunks, mask), torch.tensor([0.0, 1.0]))
    near, far = gated(trained, chunks, mask)
    torch.testing.assert_close(near, torch.cat([plain(trained, chunks, mask)[0], torch.zeros(3)]))
    torch.testing.assert_close(far, torch.cat([torch.zeros(2 + 4), scale * F.normalize(chunks[1].mean(0), dim=0)]))

    bank = torch.tensor([[0.0, 1.0, 0.0]])
    statements = StatementPretrainedPath(bank, torch.tensor([0.3, -0.1]), 0.35, 0.5, 0.01)
    with_fallback = StatementPretrainedPath(bank, torch.tensor([0.3, -0.1]), 0.35, 0.5, 0.01, fallback=True)
    assert (statements.width, with_fallback.width) == (4, 7)
    pooled = torch.tensor([[0.0, 2.0, 0.1], [1.0, 0.0, 1.0]])  # near the training statement; a new one
    item_trained = F.normalize(torch.tensor([[0.5, 1.0], [-1.0, 0.2]]), dim=-1)
    vectors = with_fallback(item_trained, pooled)
    torch.testing.assert_close(vectors[:, :6], statements(item_trained, pooled))
    torch.testing.assert_close(vectors[:, 6:], F.normalize(pooled, dim=-1))
    torch.testing.assert_close(near @ vectors.T, plain(trained, chunks, mask)[0] @ statements(item_trained, pooled).T)
    baseline = F.normalize(chunks[1].mean(0), dim=0) @ F.normalize(pooled, dim=-1).T
    torch.testing.assert_close(far @ vectors.T, scale * baseline)
    with pytest.raises(ValueError, match="come together"):
        UserPretrainedPath(mean, scale, fallback_threshold=0.4)


def test_affinity_pooling_weights_the_chunks_that_fit_the_trained_user():
    """Chunk vectors read as statements (here the identity head) are scored against the trained user; the softmax of
    the scores' z-score over the user's chunks weights the frozen chunk vectors."""
    path = UserPretrainedPath(torch.zeros(3), 1.0, chunk_map=torch.eye(3)[:, :2], chunk_bias=torch.zeros(2))
    chunks = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]]])
    mask = torch.tensor([[True, True, True, False]])
    trained = torch.tensor([[1.0, 0.0]])
    fit = torch.tensor([1.0, 0.0, 0.0])  # cosines of the real chunks' mapped vectors with the trained user
    weights = torch.softmax((fit - fit.mean()) / fit.std(unbiased=False), 0)
    expected = F.normalize((weights[:, None] * chunks[0, :3]).sum(0), dim=-1)
    torch.testing.assert_close(path.content(trained, chunks, mask)[0], expected)
    assert path.content(trained, chunks, mask)[0, 0] > path.content(trained, chunks, mask)[0, 1]
    # a user with one chunk pools to that chunk; the mean pooling of the same path is the plain mean
    torch.testing.assert_close(path.content(trained, chunks, torch.tensor([[False, True, False, False]])),
                               torch.tensor([[0.0, 1.0, 0.0]]))
    plain = UserPretrainedPath(torch.zeros(3), 1.0)
    torch.testing.assert_close(plain.content(trained, chunks, mask), F.normalize(torch.ones(1, 3), dim=-1))


def test_the_item_head_as_a_map_matches_the_head_and_refuses_a_nonlinear_one():
    from uue.model.pretrained_path import item_head_as_map
    from uue.model.towers import LowRankResidualProjection

    affine = LowRankResidualProjection(6, 2, "none")
    torch.nn.init.normal_(affine.up.weight)  # zero-initialised: give it a correction to check
    chunk_map, bias = item_head_as_map(affine, 6)
    x = torch.randn(4, 6)
    torch.testing.assert_close(x @ chunk_map + bias, affine(x), atol=1e-5, rtol=1e-5)
    gelu = LowRankResidualProjection(6, 2, "gelu")
    torch.nn.init.normal_(gelu.up.weight)
    with pytest.raises(ValueError, match="not linear"):
        item_head_as_map(gelu, 6)


def test_training_fits_the_path_and_the_saved_folder_scores_what_it_says(tmp_path, sample_data_dir):
    from uue.data.readers import load_dataset
    from uue.evaluation.evaluate import BaselineEmbedder
    from uue.model.encode import ModelEmbedder
    from uue.model.export import export_sentence_transformers
    from uue.model.folder import read_output_dim
    from uue.model.uue_model import UUEModel
    from uue.train import UUETrainer

    config = load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1",
                                                "model.novelty_threshold=0.001",
                                                "model.offset_novelty_threshold=0.001", f"data.path={sample_data_dir}",
                                                f"training.output_dir={tmp_path}", "training.max_steps=2"])
    result = UUETrainer(config).fit()
    model = UUEModel.from_pretrained(result.model_dir)
    user_path, statement_path = model.user_tower.pretrained_path, model.item_tower.pretrained_path
    assert user_path is not None and statement_path is not None
    dataset = load_dataset(sample_data_dir)
    train_statements = sorted({lab.statement_id for lab in dataset.labels if lab.split == "train"})
    train_users = sorted({lab.user_id for lab in dataset.labels if lab.split == "train"})
    assert statement_path.bank.shape == (len(train_statements), TINY_HIDDEN)
    device = torch.device("cpu")
    baseline = BaselineEmbedder(model, device, progress=False)
    # The user side's mean is the untrained baseline's mean user over the training users.
    np.testing.assert_allclose(user_path.mean.numpy(), baseline.users([dataset.users[u] for u in train_users])
                               .mean(0), atol=1e-5)

    embedder = ModelEmbedder(model, device, progress=False)
    users = [dataset.users[u] for u in sorted(dataset.users)[:5]]
    statements = [dataset.statements[s] for s in sorted(dataset.statements)[:7]]
    with_path_users, with_path_statements = embedder.users(users), embedder.statements(statements)
    assert with_path_users.shape[1] == with_path_statements.shape[1] == 16 + TINY_HIDDEN + 1
    assert read_output_dim(result.model_dir / "item_tower") == read_output_dim(result.model_dir / "user_tower") \
        == 16 + TINY_HIDDEN + 1
    np.testing.assert_allclose(np.linalg.norm(with_path_statements, axis=1), 1.0, atol=1e-5)
    # The score is the trained score plus the gated, centred baseline score, over sqrt(1 + gate^2).
    model.user_tower.pretrained_path = model.item_tower.pretrained_path = None
    trained_users, trained_statements = embedder.users(users), embedder.statements(statements)
    # The statement side's trained mean is the training users' mean trained vector.
    np.testing.assert_allclose(statement_path.trained_mean.numpy(),
                               embedder.users([dataset.users[u] for u in train_users]).mean(0), atol=1e-5)
    # The score: the trained score plus the gated, centred baseline score, minus the gated trained offset (the
    # thresholds are near 0 here: every statement is new), over the statement vector's norm.
    pretrained = baseline.statements(statements)
    novelty = statement_path.novelty(torch.as_tensor(pretrained)).numpy()
    gate = 1 / (1 + np.exp(-(novelty - 0.001) / 0.01))
    offset = gate * (trained_statements @ statement_path.trained_mean.numpy())
    centred = baseline.users(users) - user_path.mean.numpy()
    expected = (trained_users @ trained_statements.T + float(user_path.scale) * centred @ (pretrained * gate[:, None]).T
                - offset) / np.sqrt(1 + gate**2 + offset**2)
    np.testing.assert_allclose(with_path_users @ with_path_statements.T, expected, atol=1e-4)

    # The fitted scale is the weight times the trained score's spread over the centred baseline's.
    assert float(user_path.scale) > 0
    with pytest.raises(ValueError, match="pretrained path"):
        export_sentence_transformers(result.model_dir, tmp_path / "st")

    # Refitted with affinity pooling, the saved folder scores users with the fitted map, centred on the same
    # training users the fit pooled: the trained part unchanged, the content part averaging 0 over them.
    from uue.model.pretrained_path import item_head_as_map
    from uue.train.pretrained_path import fit_pretrained_path

    with pytest.raises(ValueError, match="user_pooling must be one of"):
        fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, user_pooling="affinty")
    fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, user_pooling="affinity")
    refitted = UUEModel.from_pretrained(result.model_dir)
    chunk_map, bias = item_head_as_map(refitted.item_tower.projection, TINY_HIDDEN)
    torch.testing.assert_close(refitted.user_tower.pretrained_path.chunk_map, chunk_map)
    refitted_embedder = ModelEmbedder(refitted, device, progress=False)
    train_vectors = refitted_embedder.users([dataset.users[u] for u in train_users])
    np.testing.assert_allclose(train_vectors[:, 16 : 16 + TINY_HIDDEN].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(refitted_embedder.users(users)[:, :16], trained_users, atol=1e-5)
    mean_content = baseline.users(users) - user_path.mean.numpy()
    affinity_content = refitted_embedder.users(users)[:, 16 : 16 + TINY_HIDDEN] / float(
        refitted.user_tower.pretrained_path.scale)
    assert not np.allclose(affinity_content, mean_content, atol=1e-3)  # the weights moved the pool

    # A share of the trained ranking is saved with the folder; a folder saved before the share existed loads with
    # all of it (share 1), and scores as it did.
    from safetensors.torch import load_file, save_file

    fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, trained_share=0.25)
    assert float(UUEModel.from_pretrained(result.model_dir).item_tower.pretrained_path.trained_share) == 0.25
    with pytest.raises(ValueError, match="trained_share"):
        fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, trained_share=1.5)
    fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001)
    head_file = result.model_dir / "item_tower" / "head.safetensors"
    head = load_file(str(head_file))
    save_file({k: v for k, v in head.items() if k != "pretrained_path.trained_share"}, str(head_file))
    older = UUEModel.from_pretrained(result.model_dir)
    assert float(older.item_tower.pretrained_path.trained_share) == 1.0
    np.testing.assert_allclose(ModelEmbedder(older, device, progress=False).statements(statements),
                               with_path_statements, atol=1e-5)

    # With a predicted-content weight the user side adds the centred content its trained vector predicts (a ridge
    # map fitted on the training users, the weight folded in): it predicts the training users' content better than
    # none does, the user vector's path part is scale x (content - mean + trained @ map), and weight 0 fits no map.
    with pytest.raises(ValueError, match="predicted_content_weight"):
        fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, predicted_content_weight=-1.0)
    fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, predicted_content_weight=2.0)
    predicting = UUEModel.from_pretrained(result.model_dir)
    path = predicting.user_tower.pretrained_path
    content_map = path.content_map.numpy()
    assert content_map.shape == (16, TINY_HIDDEN)
    train_embedded = ModelEmbedder(predicting, device, progress=False).users([dataset.users[u] for u in train_users])
    train_centred = baseline.users([dataset.users[u] for u in train_users]) - path.mean.numpy()
    train_predicted = train_embedded[:, :16] @ content_map / 2.0
    assert ((train_centred - train_predicted) ** 2).sum() < (train_centred**2).sum()
    embedded = ModelEmbedder(predicting, device, progress=False).users(users)
    np.testing.assert_allclose(embedded[:, :16], trained_users, atol=1e-5)
    np.testing.assert_allclose(embedded[:, 16 : 16 + TINY_HIDDEN], float(path.scale) * (
        baseline.users(users) - path.mean.numpy() + trained_users @ content_map), atol=1e-4)
    fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001)
    assert UUEModel.from_pretrained(result.model_dir).user_tower.pretrained_path.content_map is None

    # With the fallback each user is (1 - g) x the path's vector and g x scale x their baseline vector, g the
    # sigmoid of their novelty (1 - cosine to the training users' mean content); the statements gain e(x). The
    # threshold at the training users' median novelty puts users on both sides of it here.
    with pytest.raises(ValueError, match="fallback_threshold"):
        fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, fallback_threshold=2.5)
    novelty = 1.0 - baseline.users(users) @ F.normalize(path.mean, dim=0).numpy()
    threshold = float(np.median(novelty))
    fitted = fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, fallback_threshold=threshold)
    train_content = baseline.users([dataset.users[u] for u in train_users])
    train_novelty = 1.0 - train_content @ F.normalize(path.mean, dim=0).numpy()
    assert fitted["training_user_novelty_max"] == pytest.approx(float(train_novelty.max()), abs=1e-5)
    assert read_output_dim(result.model_dir / "item_tower") == read_output_dim(result.model_dir / "user_tower") \
        == 16 + 2 * TINY_HIDDEN + 1
    falling_back = UUEModel.from_pretrained(result.model_dir)
    fallback_embedder = ModelEmbedder(falling_back, device, progress=False)
    g = 1 / (1 + np.exp(-(novelty - threshold) / 0.01))
    assert g.min() < 0.5 < g.max()
    expected = (1 - g)[:, None] * (with_path_users @ with_path_statements.T) + g[:, None] * float(
        falling_back.user_tower.pretrained_path.scale) * (baseline.users(users) @ pretrained.T)
    np.testing.assert_allclose(fallback_embedder.users(users) @ fallback_embedder.statements(statements).T, expected,
                               atol=1e-4)

    # With affinity pooling the path centres on the weighted pools' mean, and the fallback still compares each
    # user's plain mean content with the training users' plain mean (saved as baseline_mean): the same novelty,
    # the same gate, and a user far from them scored as the baseline scores them.
    affinity = fit_pretrained_path(result.model_dir, dataset, 1.0, 0.001, 0.01, 0.001, user_pooling="affinity",
                                   predicted_content_weight=2.0, fallback_threshold=threshold)
    assert affinity["training_user_novelty_max"] == pytest.approx(float(train_novelty.max()), abs=1e-5)
    affinity_path = UUEModel.from_pretrained(result.model_dir).user_tower.pretrained_path
    assert not torch.allclose(affinity_path.mean, affinity_path.baseline_mean, atol=1e-3)
    torch.testing.assert_close(affinity_path.baseline_mean, path.mean, atol=1e-5, rtol=0)
    chunk_vectors = ModelEmbedder(falling_back, device, progress=False).user_encoder.chunk_vectors(users)
    affinity_novelty = [float(affinity_path.user_novelty(torch.as_tensor(v)[None], torch.ones(1, len(v), dtype=bool)))
                        for v in chunk_vectors]
    np.testing.assert_allclose(affinity_novelty, novelty, atol=1e-5)


def test_ridge_map_shrinks_the_least_squares_fit_and_predicts_held_out_rows():
    from uue.train.pretrained_path import ridge_map

    rng = np.random.default_rng(0)
    inputs, true_map = rng.normal(size=(400, 8)), rng.normal(size=(8, 5))
    targets = inputs @ true_map + 0.5 * rng.normal(size=(400, 5))
    fitted = ridge_map(inputs[:300], targets[:300]).numpy()
    least_squares = np.linalg.lstsq(inputs[:300], targets[:300], rcond=None)[0]
    assert np.linalg.norm(fitted) < np.linalg.norm(least_squares)  # the penalty shrinks it
    held_out_error = ((targets[300:] - inputs[300:] @ fitted) ** 2).mean()
    assert held_out_error < 0.5 * (targets[300:] ** 2).mean()


def test_a_path_without_raw_data_is_refused_before_training(tmp_path, sample_data_dir):
    from uue.train.pretrained_path import require_raw_data

    config = ExperimentConfig(model=load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1"])
                              .model, data={"path": str(tmp_path / "shards")})
    with pytest.raises(ValueError, match="preprocessed shards only"):
        require_raw_data(config, None)
