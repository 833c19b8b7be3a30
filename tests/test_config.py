"""Config: the seed's fields and defaults, sections, strict validation, key=value overrides, shipped YAML files,
what a saved model records."""

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
    with pytest.raises(ConfigError, match=r"model\.loss\.temperature"):
        load_config(None, ["model.loss.temperature=-1"])
    with pytest.raises(ConfigError, match=r"model\.loss\.temperature"):  # a seed name lands in its section
        load_config(None, ["model.temperature=-1"])


def test_unknown_key_inside_a_section_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"model\.heads\.projection_rnak: unknown key"):
        load_config(None, ["model.heads.projection_rnak=4"])


def test_keys_live_in_sections_and_the_seed_names_reach_them():
    config = ModelConfig(batch_size=4, projection_rank=8, projection_init="identity", embedding_dim=32)
    assert config.optim.batch_size == 4 and config.heads.projection_rank == 8 and config.towers.embedding_dim == 32
    assert config.batch_size == 4  # read by its own name
    config.batch_size = 6  # and set, validated
    assert config.optim.batch_size == 6
    with pytest.raises(ValueError):
        config.batch_size = 0
    copy = config.model_copy(update={"num_negative_samples": 3, "negatives": {"negative_sampling": "hard"}})
    assert (copy.negatives.num_negative_samples, copy.negatives.negative_sampling) == (3, "hard")
    with pytest.raises(ValueError, match="cache_chunk_vectors needs freeze_user_backbone"):
        config.model_copy(update={"cache_chunk_vectors": True})  # copies are validated
    with pytest.raises(ValueError, match="given both"):
        ModelConfig(batch_size=4, optim={"batch_size": 8})


def test_overrides_reach_nested_keys_and_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  heads:\n    projection_rank: 4\n  batch_size: 16\n")  # seed names in a file too
    config = load_config(path, ["model.heads.projection_rank=128", "model.optim.batch_size=8"]).model
    assert (config.heads.projection_rank, config.optim.batch_size) == (128, 8)
    assert load_config(path, ["model.projection_rank=2"]).model.heads.projection_rank == 2


def test_a_saved_model_records_only_what_using_it_needs():
    saved = ModelConfig(label_loss_weight=2.0, batch_size=4, attention="packed", pack_tokens=1024).saved()
    assert set(saved) == {"towers", "pooling", "heads", "packing", "loss"}
    assert saved["loss"] == {"max_logit_scale": 100.0} and saved["packing"]["attention"] == "packed"
    assert ModelConfig.from_saved(saved).packing.pack_tokens == 1024


def test_the_flat_dump_of_earlier_versions_loads_and_a_removed_pooling_is_refused():
    flat = {**ModelConfig().model_dump()["towers"], "attention_pooling_kind": "multihead",
            "freeze_item_projection": True, "projection_rank": 4, "embedding_dim": 32, "batch_size": 2}
    config = ModelConfig.from_saved(flat)
    assert (config.heads.projection_rank, config.optim.batch_size) == (4, 2)
    with pytest.raises(ValueError, match="weighted_mean"):
        ModelConfig.from_saved({**flat, "attention_pooling_kind": "weighted_mean"})
    assert ModelConfig.from_saved({**flat, "attention_pooling_kind": "weighted_mean",
                                   "use_attention_pooling": False}).pooling.use_attention_pooling is False


CACHED = ["model.freeze_user_backbone=true", "model.cache_chunk_vectors=true", "model.freeze_item_backbone=true",
          "model.cache_statement_vectors=true"]
RULES = [  # (overrides that break a rule, the message naming it, overrides that satisfy it)
    (["model.user_projection_activation=gelu"], "user_projection_activation needs projection_rank >= 1",
     ["model.projection_rank=4"]),
    (["model.cache_chunk_vectors=true"], "cache_chunk_vectors needs freeze_user_backbone: true",
     ["model.freeze_user_backbone=true"]),
    (["model.cache_statement_vectors=true"], "cache_statement_vectors needs freeze_item_backbone: true",
     ["model.freeze_item_backbone=true"]),
    (["model.distill_weight=1", "model.use_attention_pooling=false"],
     "distill_weight needs cache_chunk_vectors and cache_statement_vectors", CACHED),
    ([*CACHED, "model.distill_weight=1"], r"distill_weight needs mean pooling \(use_attention_pooling: false\)",
     ["model.use_attention_pooling=false"]),
    (["model.attention=packed", "model.pack_tokens=200"], r"pack_tokens=200 must hold the longest sequence \(250",
     ["model.pack_tokens=256"]),
    (["model.attention=packed", "model.pack_tokens=1024", "model.pack_min_tokens=2048"],
     "pack_min_tokens=2048 is wider than pack_tokens=1024", ["model.pack_min_tokens=512"]),
    (["model.cache_hidden_states=true"], "cache_hidden_states needs user_trainable_layers or item_trainable_layers",
     ["model.item_trainable_layers=2"]),
    (["model.freeze_item_backbone=true", "model.item_trainable_layers=2", "model.cache_hidden_states=true"],
     "cache_hidden_states needs .* on a tower whose backbone is not frozen", ["model.freeze_item_backbone=false"]),
    (["index.min_actors=3", "index.max_actors=2"], r"min_actors \(3\) > max_actors \(2\)", ["index.max_actors=3"]),
]


@pytest.mark.parametrize(("broken", "rule", "fix"), RULES, ids=[rule.split(" needs")[0][:40] for _, rule, _ in RULES])
def test_each_combination_rule_is_enforced_by_name_and_lifted_by_its_fix(broken, rule, fix):
    """The project's own rules between keys: the error names the rule, and doing what it asks is accepted."""
    with pytest.raises(ConfigError, match=rule):
        load_config(None, broken)
    load_config(None, [*broken, *fix])


def test_a_key_given_flat_and_in_its_section_and_an_override_into_a_value_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  batch_size: 16\n  optim:\n    batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"model\.batch_size is given both as batch_size and as optim\.batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match="'path' is not a section"):
        load_config(None, ["data.path=here", "data.path.deeper=1"])


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
