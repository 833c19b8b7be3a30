"""Top-N fine-tuning on cached hidden states: the frozen lower blocks run once, a step runs only the top.

Checked against running the whole backbone with the lower blocks frozen (tiny presets, float32 storage):
same outputs, same gradients, same training run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uue.chunk_cache import HiddenStateCache, statement_hidden_features
from uue.config import ConfigError, ExperimentConfig, ModelConfig, TrainingConfig, load_config
from uue.data.featurize import Featurizer, collate, trim_batch
from uue.data.readers import load_dataset
from uue.model.backbone import forward_from_layer, hidden_states_at, load_backbone
from uue.model.uue_model import UUEModel
from uue.train import UUETrainer


def _top_n(config: ModelConfig, cache: bool, layers: int = 1) -> ModelConfig:
    return config.model_copy(update={"user_trainable_layers": layers, "item_trainable_layers": layers,
                                     "cache_hidden_states": cache, "hidden_cache_dtype": "float32"})


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_forward_from_a_cut_equals_the_whole_backbone(preset, layer):
    model, tokenizer = load_backbone(preset, seed=3)
    model.eval()
    batch = tokenizer(["likes sci-fi", "a much longer sentence than the other one", "x"], padding=True,
                      return_tensors="pt")
    whole = model(**batch).last_hidden_state
    hidden = hidden_states_at(model, batch["input_ids"], batch["attention_mask"], layer)
    top = forward_from_layer(model, hidden, batch["attention_mask"], layer)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(top[real], whole[real], rtol=1e-5, atol=1e-5)
    if preset == "tiny" and layer == model.config.num_hidden_layers:  # no block above the cut, no final norm
        torch.testing.assert_close(top, hidden)


def test_outputs_and_gradients_equal_the_frozen_bottom_backbone(tiny_model_config, sample_data_dir):
    """User and item towers with their top block trainable: cached hidden states vs tokens through all blocks."""
    base = tiny_model_config.model_copy(update={"use_attention_pooling": True, "num_negative_samples": 0})
    plain = UUEModel.from_config(_top_n(base, cache=False), seed=0)
    cached = UUEModel.from_config(_top_n(base, cache=True), seed=0)
    cached.load_state_dict(plain.state_dict())
    featurizer = Featurizer(plain.config, plain.user_tokenizer, plain.item_tokenizer)
    dataset = load_dataset(sample_data_dir)
    users = list(dataset.users.values())[:5]
    statements = list(dataset.statements.values())[:5]
    cache = HiddenStateCache(cached.user_tower.encoder, featurizer, cached.user_tower.hidden_cut,
                             dtype=torch.float32, progress=False)
    cache.precompute(users)
    item_tokens = featurizer.statement_features(statements)
    item_hidden = statement_hidden_features(cached.item_tower.encoder, item_tokens, cached.item_tower.hidden_cut,
                                            dtype=torch.float32)
    tokens = trim_batch({**collate([featurizer.user_features(u) for u in users]),
                         **{k: torch.as_tensor(v) for k, v in item_tokens.items()}})
    hidden = trim_batch({**collate([cache.features(u) for u in users]),
                         **{k: torch.as_tensor(v) for k, v in item_hidden.items()}})
    assert "user_input_ids" not in hidden and "item_input_ids" not in hidden
    results = []
    for model, batch in ((plain, tokens), (cached, hidden)):
        model.train()
        users_out, items_out = model.encode_users(batch), model.encode_statements(batch)
        (users_out @ items_out.T).logsumexp(1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((users_out.detach(), items_out.detach(), grads))
    (u_plain, i_plain, g_plain), (u_cached, i_cached, g_cached) = results
    torch.testing.assert_close(u_cached, u_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i_cached, i_plain, rtol=1e-5, atol=1e-5)
    assert set(g_cached) == set(g_plain)
    trained_blocks = {n for n in g_plain if ".layer.1." in n}
    assert trained_blocks and not {n for n in g_plain if ".layer.0." in n or "embeddings" in n}
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_streaming_loop_refuses_the_hidden_cache(tiny_model_config, sample_data_dir, tmp_path):
    """Until the streaming loop reads it, the option fails loudly instead of silently training on tokens."""
    config = ExperimentConfig(model=_top_n(tiny_model_config, cache=True), training=TrainingConfig(
        output_dir=str(tmp_path), max_steps=1, progress_bar=False))
    config.data.path = str(sample_data_dir)
    with pytest.raises(ValueError, match="cache_hidden_states .* is not wired into the streaming training loop"):
        UUETrainer(config)


def test_float16_storage_stays_close(tiny_model_config, sample_data_dir):
    config = _top_n(tiny_model_config, cache=True)
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    users = list(load_dataset(sample_data_dir).users.values())[:4]
    half = HiddenStateCache(model.user_tower.encoder, featurizer, model.user_tower.hidden_cut, progress=False)
    assert half.features(users[0])["chunk_hidden"].dtype == np.float16
    with torch.no_grad():
        exact = model.encode_users(collate([featurizer.user_features(u) for u in users]))
        approx = model.encode_users(trim_batch(collate([half.features(u) for u in users])))
    assert float((exact * approx).sum(1).min()) > 0.999


def test_hidden_cache_needs_a_top_n_tower():
    with pytest.raises(ConfigError, match="cache_hidden_states needs user_trainable_layers"):
        load_config(None, ["model.cache_hidden_states=true"])
    with pytest.raises(ConfigError, match="cache_hidden_states needs"):
        load_config(None, ["model.cache_hidden_states=true", "model.user_trainable_layers=1",
                           "model.freeze_user_backbone=true"])
    config = load_config(None, ["model.cache_hidden_states=true", "model.item_trainable_layers=2"])
    assert config.model.hidden_cache_layers("item") == 2 and config.model.hidden_cache_layers("user") is None
