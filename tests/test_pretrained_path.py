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
    assert load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1"]).model.pretrained_path \
        .pretrained_path_weight == 1


def test_gate_keeps_trained_statements_and_opens_for_new_ones():
    bank = torch.eye(4)[:2]  # two training statements
    path = StatementPretrainedPath(bank, threshold=0.35, sharpness=0.01)
    trained = F.normalize(torch.tensor([[1.0, 2.0], [2.0, -1.0], [0.5, 0.5]]), dim=-1)
    pooled = torch.tensor([[3.0, 0.0, 0.0, 0.0],  # a training statement: novelty 0
                           [1.0, 1.0, 0.0, 0.0],  # between the two: novelty 1 - cos 45 degrees = 0.29
                           [0.0, 0.0, 2.0, 0.0]])  # orthogonal to both: novelty 1
    gate = path.gate(F.normalize(pooled, dim=-1))
    assert gate[0] < 1e-6 and gate[1] < 0.01 and gate[2] > 1 - 1e-6
    # A wider sigmoid (novelty_sharpness) half-opens the gate for the statement between the two (0.29 vs 0.35).
    options = load_config("configs/tiny.yaml", ["model.novelty_sharpness=0.1"]).model.pretrained_path
    sharpness = options.novelty_sharpness
    softer = StatementPretrainedPath(bank, threshold=0.35, sharpness=sharpness).gate(F.normalize(pooled, dim=-1))
    assert 0.3 < float(softer[1]) < 0.4 and float(softer[0]) < 0.05
    out = path(trained, pooled)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))  # statement vectors stay unit
    torch.testing.assert_close(out[0], torch.cat([trained[0], torch.zeros(4)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], torch.cat([trained[2], torch.tensor([0.0, 0.0, 1.0, 0.0])]) / 2**0.5)


def test_user_side_adds_the_centred_content_at_the_fitted_scale():
    path = UserPretrainedPath(mean=torch.tensor([0.5, 0.5, 0.0]), scale=2.0)
    out = path(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.0]]))


def test_training_fits_the_path_and_the_saved_folder_scores_what_it_says(tmp_path, sample_data_dir):
    from uue.data.readers import load_dataset
    from uue.evaluation.evaluate import BaselineEmbedder
    from uue.model.encode import ModelEmbedder
    from uue.model.export import export_sentence_transformers
    from uue.model.folder import read_output_dim
    from uue.model.uue_model import UUEModel
    from uue.train import UUETrainer

    config = load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1",
                                                "model.novelty_threshold=0.001", f"data.path={sample_data_dir}",
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
    assert with_path_users.shape[1] == with_path_statements.shape[1] == 16 + TINY_HIDDEN
    assert read_output_dim(result.model_dir / "item_tower") == 16 + TINY_HIDDEN
    np.testing.assert_allclose(np.linalg.norm(with_path_statements, axis=1), 1.0, atol=1e-5)
    # The score is the trained score plus the gated, centred baseline score, over sqrt(1 + gate^2).
    model.user_tower.pretrained_path = model.item_tower.pretrained_path = None
    trained_users, trained_statements = embedder.users(users), embedder.statements(statements)
    pretrained = baseline.statements(statements)
    gate = statement_path.gate(torch.as_tensor(pretrained)).numpy()
    centred = baseline.users(users) - user_path.mean.numpy()
    expected = (trained_users @ trained_statements.T + float(user_path.scale) * centred @ (pretrained * gate[:, None]).T
                ) / np.sqrt(1 + gate**2)
    np.testing.assert_allclose(with_path_users @ with_path_statements.T, expected, atol=1e-4)

    # The fitted scale is the weight times the trained score's spread over the centred baseline's.
    assert float(user_path.scale) > 0
    with pytest.raises(ValueError, match="pretrained path"):
        export_sentence_transformers(result.model_dir, tmp_path / "st")


def test_a_path_without_raw_data_is_refused_before_training(tmp_path, sample_data_dir):
    from uue.train.pretrained_path import require_raw_data

    config = ExperimentConfig(model=load_config("configs/tiny.yaml", [*FROZEN, "model.pretrained_path_weight=1"])
                              .model, data={"path": str(tmp_path / "shards")})
    with pytest.raises(ValueError, match="preprocessed shards only"):
        require_raw_data(config, None)
