"""Top-N fine-tuning on cached hidden states: the frozen lower blocks run once, a step runs only the top.

Checked against running the whole backbone with the lower blocks frozen (tiny presets, float32 storage):
same outputs, same gradients; and in the streaming training loop (float16 storage, as trained): the same
run, the lower blocks untouched, an exact resume, and the same run on a Ray Train worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uue.config import ConfigError, ExperimentConfig, ModelConfig, TrainingConfig, load_config
from uue.data.featurize import Featurizer, collate, trim_batch
from uue.data.readers import load_dataset
from uue.model.backbone import forward_from_layer, hidden_states_at, load_backbone
from uue.model.cache import FrozenPrefixCache
from uue.model.inputs import StatementBatch, UserBatch
from uue.model.uue_model import UUEModel
from uue.train import UUETrainer
from uue.train.checkpoint import latest_checkpoint
from uue.train.stream import BatchCollator, StatementTable


def _top_n(config: ModelConfig, cache: bool, layers: int = 1) -> ModelConfig:
    return config.model_copy(update={"user_trainable_layers": layers, "item_trainable_layers": layers,
                                     "cache_hidden_states": cache, "hidden_cache_dtype": "float32"})


def _caches(model: UUEModel, dtype: torch.dtype, micro_batch: int = 32) -> tuple[FrozenPrefixCache, FrozenPrefixCache]:
    """The frozen-prefix caches of the user and item towers' bottoms (below their cuts)."""
    user = FrozenPrefixCache(model.user_tower.encoder, model.user_tokenizer, model.user_tower.hidden_cut,
                             hidden_dtype=dtype, micro_batch=micro_batch)
    item = FrozenPrefixCache(model.item_tower.encoder, model.item_tokenizer, model.item_tower.hidden_cut,
                             hidden_dtype=dtype)
    return user, item


def _user_rows(featurizer: Featurizer, users: list) -> list[dict]:
    """Users as rows of the users shards (ragged chunk tokens), each with one positive."""
    return [{"user_id": user.user_id, "positives": [0], "label_statements": [], "label_values": [],
             "chunk_tokens": featurizer.user_tokens(user)} for user in users]


def _hidden_inputs(model: UUEModel, featurizer: Featurizer, users: list, statements: list,
                   dtype: torch.dtype) -> tuple[UserBatch, StatementBatch]:
    """The users and statements as the training loop reads them from the caches: hidden states at the cuts."""
    user_cache, item_cache = _caches(model, dtype)
    table = StatementTable({"statement_id": [s.statement_id for s in statements],
                            "tokens": featurizer.statement_tokens(statements)}, featurizer, item_cache)
    batch = BatchCollator(model.config, featurizer, table, 0, user_cache)(_user_rows(featurizer, users), 0)
    return batch.users, table.gather(range(len(statements)))


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
    tokens = (UserBatch.from_features(trim_batch(collate([featurizer.user_features(u) for u in users]))),
              StatementBatch.from_features(featurizer.statement_features(statements)).trimmed())
    hidden = _hidden_inputs(cached, featurizer, users, statements, torch.float32)
    assert hidden[0].chunks.kind == "hidden" and hidden[1].text.kind == "hidden"
    results = []
    for model, (user_batch, statement_batch) in ((plain, tokens), (cached, hidden)):
        model.train()
        users_out, items_out = model.encode_users(user_batch), model.encode_statements(statement_batch)
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


def test_float16_storage_stays_close(tiny_model_config, sample_data_dir):
    config = _top_n(tiny_model_config, cache=True)
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    dataset = load_dataset(sample_data_dir)
    users = list(dataset.users.values())[:4]
    half, _ = _hidden_inputs(model, featurizer, users, list(dataset.statements.values())[:2], torch.float16)
    assert half.chunks.hidden.dtype == torch.float16
    with torch.no_grad():
        exact = model.encode_users(UserBatch.from_features(collate([featurizer.user_features(u) for u in users])))
        approx = model.encode_users(half)
    assert float((exact * approx).sum(1).min()) > 0.999


def test_hidden_cache_needs_a_top_n_tower():
    with pytest.raises(ConfigError, match="cache_hidden_states needs user_trainable_layers"):
        load_config(None, ["model.cache_hidden_states=true"])
    with pytest.raises(ConfigError, match="cache_hidden_states needs"):
        load_config(None, ["model.cache_hidden_states=true", "model.user_trainable_layers=1",
                           "model.freeze_user_backbone=true"])
    config = load_config(None, ["model.cache_hidden_states=true", "model.item_trainable_layers=2"])
    assert config.model.hidden_cache_layers("item") == 2 and config.model.hidden_cache_layers("user") is None


# ---------------------------------------------------------------------------------- the streaming training loop
def _run(config: ModelConfig, out: Path, **training) -> ExperimentConfig:
    """Sample data (32 training users, 4 steps an epoch at batch 8), top block of both towers trainable."""
    experiment = ExperimentConfig(model=config, training=TrainingConfig(
        output_dir=str(out), progress_bar=False, log_every_steps=1, **training))
    experiment.data.path = str(Path(__file__).resolve().parent.parent / "uue" / "data" / "sample_data")
    return experiment


def _streamed(tiny_model_config: ModelConfig, cache: bool, **update) -> ModelConfig:
    """Top-1 block training, float16 cache (as trained), random negatives and the label loss (their pools)."""
    return tiny_model_config.model_copy(update={
        "user_trainable_layers": 1, "item_trainable_layers": 1, "cache_hidden_states": cache,
        "use_attention_pooling": True, "negative_sampling": "random", "num_negative_samples": 2,
        "label_loss_weight": 0.5, "labels_per_user": 3, "positives_per_user": 2, **update})


def _frozen_bottom(name: str) -> bool:
    return "encoder.backbone." in name and ".layer.1." not in name


def _ragged(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [row[used.astype(bool)].tolist() for row, used in zip(ids, mask, strict=True) if used.any()]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])  # right and left padding
def test_the_collators_hidden_batches_encode_like_its_token_batches(tiny_model_config, sample_data_dir, preset):
    """BatchCollator over user rows (ragged chunk tokens): the per-user cache of chunk hidden states (real
    tokens only, padded at the batch) and the statement table's hidden states give the towers' token outputs."""
    config = _top_n(tiny_model_config.model_copy(update={  # chunks of 36-76 bytes: none truncated, padding varies
        "user_model_name": preset, "item_model_name": preset, "positives_per_user": 2, "max_chunk_length": 96}),
        cache=True)
    model = UUEModel.from_config(config, seed=0).eval()
    featurizer = Featurizer(config, model.user_tokenizer, model.item_tokenizer)
    dataset = load_dataset(sample_data_dir)
    item_tokens = featurizer.statement_features(list(dataset.statements.values())[:6])
    statement_table = {"statement_id": [str(i) for i in range(6)],
                       "tokens": _ragged(item_tokens["item_input_ids"], item_tokens["item_attention_mask"])}
    table = StatementTable(statement_table, featurizer)
    rows = []
    for i, user in enumerate(list(dataset.users.values())[:3]):
        feats = featurizer.user_features(user)
        rows.append({"user_id": user.user_id, "positives": [i, i + 3], "label_statements": [], "label_values": [],
                     "chunk_tokens": _ragged(feats["user_input_ids"], feats["user_attention_mask"])})
    plain_batch = BatchCollator(config, featurizer, table, seed=0)(rows, 0)
    # several micro-batches of chunks, each padded to its own longest chunk
    cache, item_cache = _caches(model, torch.float32, micro_batch=4)
    hidden_table = StatementTable(statement_table, featurizer, item_cache)
    hidden_batch = BatchCollator(config, featurizer, hidden_table, 0, cache)(rows, 0)
    plain_chunks, hidden_chunks = plain_batch.users.chunks, hidden_batch.users.chunks
    assert hidden_chunks.hidden.shape[:3] == plain_chunks.input_ids.shape
    assert not plain_chunks.attention_mask[plain_batch.users.chunk_mask].all()  # padding to place
    torch.testing.assert_close(hidden_chunks.attention_mask, plain_chunks.attention_mask)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_users(hidden_batch.users), model.encode_users(plain_batch.users),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_statements(hidden_batch.positives),
                                   model.encode_statements(plain_batch.positives), rtol=1e-5, atol=1e-5)


def test_training_on_cached_hidden_states_equals_the_whole_backbone_run(tiny_model_config, tmp_path):
    """Per-step losses of 6 steps (an epoch boundary: the second epoch reads users cached in the first)."""
    plain = UUETrainer(_run(_streamed(tiny_model_config, cache=False), tmp_path / "plain", max_steps=6))
    cached = UUETrainer(_run(_streamed(tiny_model_config, cache=True), tmp_path / "cached", max_steps=6))
    batch = cached.inputs.collate(next(cached.loop.stream.steps(0, 1)).rows, 0)
    assert batch.users.chunks.kind == "hidden" and batch.positives.text.kind == "hidden"
    assert batch.users.chunks.hidden.dtype == torch.float16 and batch.users.chunks.hidden.dim() == 4
    assert cached.samplers.negative is not None and cached.samplers.negative.pool.hidden is not None
    cached.inputs.collate.chunk_cache.users.clear()  # computed again on first use, as in the run

    plain_losses = [h["loss"] for h in plain.fit().history]
    cached_run = cached.fit().history
    np.testing.assert_allclose([h["loss"] for h in cached_run], plain_losses, rtol=1e-3)
    assert len(cached.inputs.collate.chunk_cache.users) == 32  # every training user once, reused in epoch 2
    assert cached_run[0]["user_tokens"] == 0 and cached_run[0]["item_tokens"] == 0  # no backbone tokens


def test_the_cached_runs_lower_blocks_get_no_gradient_and_stay_as_they_were(tiny_model_config, tmp_path):
    trainer = UUETrainer(_run(_streamed(tiny_model_config, cache=True), tmp_path, max_steps=3))
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    bottom = {n for n in initial if _frozen_bottom(n)}
    top = {n for n in initial if "encoder.backbone." in n and ".layer.1." in n}
    assert bottom and top
    params = dict(trainer.model.named_parameters())
    grads_seen: set[str] = set()
    hooks = [params[n].register_hook(lambda grad, name=n: grads_seen.add(name)) for n in top]
    trainer.fit()
    for hook in hooks:
        hook.remove()
    assert grads_seen == top  # the top block trains on the cached hidden states
    for name in bottom:
        assert not params[name].requires_grad and params[name].grad is None, name
        torch.testing.assert_close(params[name], initial[name], rtol=0, atol=0, msg=name)
    assert all(not torch.equal(params[name], initial[name]) for name in top)


def test_a_resumed_cached_run_equals_the_uninterrupted_one(tiny_model_config, tmp_path):
    """Semi-hard negatives refreshed every 2 steps on the pool's hidden states, across an epoch boundary."""
    config = _streamed(tiny_model_config, cache=True, negative_sampling="semi_hard", negative_refresh_steps=2)
    n = 3
    full = UUETrainer(_run(config, tmp_path / "full", max_steps=2 * n))
    full_result = full.fit()
    first = UUETrainer(_run(config, tmp_path / "resumed", max_steps=2 * n, checkpoint_every_steps=n))
    first.fit(max_steps=n)
    assert latest_checkpoint(tmp_path / "resumed").name == f"step_{n:06d}"
    second = UUETrainer(_run(config, tmp_path / "resumed", max_steps=2 * n, checkpoint_every_steps=n))
    second_result = second.fit(resume_from="latest")

    assert second_result.steps == 2 * n and second.inputs.collate.calls == n
    # The skipped batches' users were not run through the lower blocks.
    assert len(second.inputs.collate.chunk_cache.users) <= n * config.batch_size
    np.testing.assert_allclose([h["loss"] for h in second_result.history],
                               [h["loss"] for h in full_result.history[n:]], rtol=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        # Attention key biases get ~0 gradients (softmax ignores them) that Adam turns into steps of float
        # noise: a chunk shared by users is encoded once, in whichever micro-batch first needs it, which
        # differs between the two runs (differences up to 4e-6 there, under 3e-7 everywhere else).
        atol = 1e-5 if name.endswith(("key.bias", "in_proj_bias")) else 1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)


def test_ray_refuses_the_user_hidden_cache_under_zero3(tiny_model_config, tmp_path):
    from uue.train.ray import run_training

    config = _run(_streamed(tiny_model_config, cache=True), tmp_path, max_steps=1)
    config.distributed.zero_stage = 3
    with pytest.raises(ValueError, match="cache_hidden_states runs the frozen user backbone .* zero_stage <= 2"):
        run_training(config)


@pytest.mark.slow
def test_one_ray_worker_on_cached_hidden_states_equals_uue_train(ray_session, tiny_model_config, tmp_path):
    """Ray Train (1 worker, DeepSpeed ZeRO-0) builds the same caches in its worker: the same per-step losses."""
    from uue.train.ray import run_training

    local = UUETrainer(_run(_streamed(tiny_model_config, cache=True), tmp_path / "local", max_steps=4))
    local_losses = [h["loss"] for h in local.fit().history]
    config = _run(local.config.model, tmp_path / "ray", max_steps=4)
    config.data.path = local.shards.uri  # the shards the local run wrote: no Ray Data preprocessing
    config.distributed.zero_stage = 0
    config.distributed.cpus_per_worker = config.distributed.featurize_cpus = 0.5
    assert run_training(config).steps == 4
    ray_losses = [json.loads(line)["loss"] for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ray_losses, local_losses, rtol=2e-4)
