"""Config: the seed's fields and defaults, strict validation, key=value overrides, shipped YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from uue.config import ConfigError, ExperimentConfig, ModelConfig, load_config

REPO = Path(__file__).resolve().parent.parent

SEED_DEFAULTS = {
    "user_model_name": "Qwen/Qwen3-Embedding-0.6B", "item_model_name": "Qwen/Qwen3-Embedding-0.6B",
    "embedding_dim": 1024, "max_chunk_length": 250, "max_statement_length": 128, "max_context_length": 64,
    "batch_size": 32, "learning_rate": 2e-5, "temperature": 0.1, "num_epochs": 10, "num_chunks_per_user": 100,
    "num_negative_samples": 15, "use_attention_pooling": True, "attention_heads": 8, "dropout": 0.1,
    "use_user_metadata": False, "use_item_metadata": False, "metadata_dim": 64, "item_metadata_dim": 64,
}


def test_model_config_keeps_every_seed_field_and_default():
    config = ModelConfig()
    for name, default in SEED_DEFAULTS.items():
        assert getattr(config, name) == default, name


def test_seed_style_keyword_construction():
    config = ModelConfig(user_model_name="minilm", batch_size=4, use_user_metadata=True)
    assert (config.user_model_name, config.batch_size, config.use_user_metadata) == ("minilm", 4, True)


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"model\.batch_sise: unknown key"):
        load_config(path)


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.temperature"):
        load_config(None, ["model.temperature=-1"])


def test_overrides_parse_yaml_scalars():
    config = load_config(REPO / "configs" / "tiny.yaml",
                         ["model.batch_size=4", "model.learning_rate=3e-4", "model.use_user_metadata=true",
                          "training.max_steps=null", "data.path=/some/where"])
    assert config.model.batch_size == 4
    assert config.model.learning_rate == pytest.approx(3e-4)
    assert config.model.use_user_metadata is True
    assert config.training.max_steps is None
    assert config.data.path == "/some/where"


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.batch_size"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_config_validates(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
