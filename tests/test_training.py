"""Training loop: shards as input, exact and cheap resume, checkpoints, per-tower learning rates, schedule,
inference round trip, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from uue.config import ExperimentConfig, TrainingConfig
from uue.data.chunking import split_long_chunks
from uue.data.featurize import Featurizer
from uue.data.readers import dataset_from_users
from uue.data.schema import UserChunk, UserData
from uue.data.shards import PreprocessedMismatchError, Shards, check_manifest
from uue.model import UUEModel, load_tower
from uue.model.inference import UUEInference
from uue.train import UUETrainer
from uue.train.checkpoint import latest_checkpoint
from uue.train.step import param_groups, warmup_cosine

REPO = Path(__file__).resolve().parent.parent


def _experiment(model_config, out: Path, **training) -> ExperimentConfig:
    return ExperimentConfig(
        model=model_config,
        data={"path": str(REPO / "uue" / "data" / "sample_data")},
        training=TrainingConfig(output_dir=str(out), progress_bar=False, log_every_steps=1, **training),
    )


def test_resumed_run_equals_uninterrupted_run_and_skips_without_collating(tiny_model_config, tmp_path):
    # Dropout, semi-hard negatives refreshed every 2 steps, 2 of each user's 4 positives per step (drawn per
    # epoch) and an epoch boundary (32 training users / 8 = 4 steps per epoch) exercise every piece of state
    # a resume must restore.
    cfg = tiny_model_config.model_copy(update={
        "dropout": 0.1, "negative_sampling": "semi_hard", "num_negative_samples": 2, "negative_refresh_steps": 2,
        "label_loss_weight": 0.5, "labels_per_user": 3,  # the label sampler's draws must resume too
        "positives_per_user": 2,
    })
    n = 5
    full = UUETrainer(_experiment(cfg, tmp_path / "full", max_steps=2 * n))
    full_result = full.fit()

    first = UUETrainer(_experiment(cfg, tmp_path / "resumed", max_steps=2 * n, checkpoint_every_steps=n))
    first.fit(max_steps=n)
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint is not None and checkpoint.name == f"step_{n:06d}"
    second = UUETrainer(_experiment(cfg, tmp_path / "resumed", max_steps=2 * n, checkpoint_every_steps=n))
    second_result = second.fit(resume_from="latest")

    assert second_result.steps == 2 * n
    # The resumed run read past the first n batches without collating (padding, encoding) any of them.
    assert second.inputs.collate.calls == n and full.inputs.collate.calls == 2 * n
    resumed_losses = [h["loss"] for h in second_result.history]
    full_losses = [h["loss"] for h in full_result.history[n:]]
    np.testing.assert_allclose(resumed_losses, full_losses, rtol=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_are_loadable_without_the_trainer_and_pruned(tiny_model_config, tmp_path):
    trainer = UUETrainer(_experiment(tiny_model_config, tmp_path, max_steps=4, checkpoint_every_steps=1,
                                     keep_checkpoints=2))
    result = trainer.fit()
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step_000003", "step_000004"]
    last = tmp_path / "checkpoints" / "step_000004"
    assert (last / "training_state.json").is_file() and (last / "optimizer" / "torch.pt").is_file()
    assert (last / "ranks" / "rank_0.pt").is_file()
    for tower in ("user_tower", "item_tower"):
        assert (last / "model" / tower / "backbone" / "model.safetensors").is_file()
        assert (last / "model" / tower / "head.safetensors").is_file()
        load_tower(last / "model" / tower)
    assert result.model_dir == tmp_path / "model"
    reloaded = UUEModel.from_pretrained(result.model_dir)
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_training_reduces_the_loss_over_the_whole_epoch(tiny_model_config, tmp_path):
    trainer = UUETrainer(_experiment(tiny_model_config.model_copy(update={"learning_rate": 3e-3}), tmp_path,
                                     max_steps=48))

    batches = [trainer.inputs.collate(s.rows, s.epoch)
               for s in trainer.loop.stream.steps(0, trainer.steps_per_epoch)]

    def epoch_loss() -> float:
        trainer.objective.eval()
        with torch.no_grad():
            return float(np.mean([float(trainer.objective(b)[0]) for b in batches]))

    before = epoch_loss()
    trainer.fit()
    assert epoch_loss() < before - 0.05


def test_towers_get_their_own_learning_rates(tiny_model_config):
    cfg = tiny_model_config.model_copy(update={"user_learning_rate": 1e-5, "item_learning_rate": 3e-5,
                                               "head_learning_rate": 1e-3})
    model = UUEModel.from_config(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["user_backbone"]["lr"] == 1e-5 and groups["item_backbone"]["lr"] == 3e-5
    assert groups["head"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.0 for name, g in groups.items() if name.endswith("no_decay"))
    assert any(p is model.logit_scale for p in groups["head_no_decay"]["params"])
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_backbone_parameters_are_not_optimised(tiny_model_config):
    cfg = tiny_model_config.model_copy(update={"freeze_user_backbone": True})
    names = {g["name"] for g in param_groups(UUEModel.from_config(cfg), cfg)}
    assert not any(n.startswith("user_backbone") for n in names)


def test_warmup_then_cosine():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(100) == pytest.approx(0.0, abs=1e-9)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))


def test_inference_from_saved_model_matches_the_trained_model(tiny_model_config, tmp_path):
    trainer = UUETrainer(_experiment(tiny_model_config, tmp_path, max_steps=2))
    result = trainer.fit()
    live = UUEInference(trainer.model)
    saved = UUEInference.from_pretrained(result.model_dir)
    chunks = [UserChunk("Summited the ridge at dawn", "forum", "2025-01-01T00:00:00Z"), "plain string chunk",
              {"text": "a dict chunk", "platform": "chat"}]
    np.testing.assert_allclose(saved.get_user_embedding(chunks), live.get_user_embedding(chunks), rtol=1e-5, atol=1e-6)
    u = saved.get_user_embedding(chunks)
    s = saved.get_statement_embedding("loves hiking in the mountains")
    assert np.linalg.norm(u) == pytest.approx(1.0, rel=1e-5)
    assert saved.compute_similarity(chunks, "loves hiking in the mountains") == pytest.approx(float(u @ s), rel=1e-5)
    with pytest.raises(ValueError, match="at least one chunk"):
        saved.get_user_embedding([])
    with pytest.raises(ValueError, match="empty text"):
        saved.get_user_embedding(["  "])
    with pytest.raises(TypeError, match="chunk 0"):
        saved.get_user_embedding([42])


def test_seed_api_trains_from_userdata_and_changes_only_the_weights_that_train(tiny_model_config, tmp_path):
    topics = {"hiking": "walked the ridge trail", "cooking": "braised short ribs", "jazz": "bebop sax solo",
              "games": "beat the final boss"}
    users = [UserData(f"u{i}", [UserChunk(text)], statements=[f"likes {topic}"])
             for i, (topic, text) in enumerate(list(topics.items()) * 4)]
    cfg = tiny_model_config.model_copy(update={"batch_size": 4, "freeze_user_backbone": True})
    trainer = UUETrainer(ExperimentConfig(model=cfg, training={"output_dir": str(tmp_path), "progress_bar": False}),
                         dataset=dataset_from_users(users))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    result = trainer.train(max_steps=2)
    assert result.steps == 2 and trainer.shards.train_users == 16
    after = dict(trainer.model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name].detach())}
    frozen = {name for name in before if name.startswith("user_tower.encoder.")}
    assert frozen and not changed & frozen  # the frozen user backbone is untouched
    assert all(after[name].requires_grad for name in changed)  # and so is anything else outside training
    for part in ("user_tower.pooling.", "user_tower.projection.", "item_tower.encoder.", "item_tower.projection.",
                 "logit_scale"):  # every part that trains has moved
        assert any(name.startswith(part) for name in changed), part
    assert "label_bias" not in changed  # no label loss in this config: its bias stays out


def test_cli_train_and_clear_config_errors(tmp_path):
    uue = [sys.executable, "-m", "uue.cli"]
    ok = subprocess.run([*uue, "train", "--config", str(REPO / "configs" / "tiny.yaml"),
                         f"training.output_dir={tmp_path}", "training.max_steps=2"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "trained 2 steps" in ok.stdout and (tmp_path / "model" / "uue.json").is_file()
    bad = subprocess.run([*uue, "train", "--config", str(REPO / "configs" / "tiny.yaml"), "model.batch_sise=3"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "model.batch_sise: unknown key" in bad.stderr


def test_shards_store_ragged_tokens_and_training_labels_and_refuse_another_config(tiny_model_config, tmp_path):
    trainer = UUETrainer(_experiment(tiny_model_config, tmp_path, max_steps=1))
    shards, dataset, featurizer = trainer.shards, trainer.dataset, trainer.featurizer
    assert shards.manifest["counts"] == {"users": 48, "train_users": 32, "positives": 128, "statements": 16,
                                         "labels": 384, "rejected": 0}
    statements = shards.statements()
    assert statements["statement_id"] == sorted(dataset.statements)
    rows = [r for block in Shards.open(shards.uri).iter_train_users() for r in block]
    assert len(rows) == 32
    for row in rows:
        user = dataset.users[row["user_id"]]
        # Long texts are split into token-bounded pieces first, as Ray preprocessing does.
        padded = featurizer.user_features(split_long_chunks(user.chunks, featurizer.user_tokenizer, 32))
        kept = int(padded["chunk_mask"].sum())
        assert len(row["chunk_tokens"]) == kept  # no padding chunks stored ...
        for tokens, ids, mask in zip(row["chunk_tokens"], padded["user_input_ids"], padded["user_attention_mask"],
                                     strict=False):
            assert tokens == ids[mask.astype(bool)].tolist()  # ... nor padding tokens
        labels = [lab for lab in dataset.labels_in("train") if lab.user_id == row["user_id"]]
        as_index = {(statements["statement_id"][s], v) for s, v in zip(row["label_statements"], row["label_values"],
                                                                        strict=True)}
        assert as_index == {(lab.statement_id, lab.label) for lab in labels}
        assert {statements["statement_id"][s] for s in row["positives"]} == {
            lab.statement_id for lab in labels if lab.label == 1}

    other = Featurizer(tiny_model_config.model_copy(update={"max_chunk_length": 16}), featurizer.user_tokenizer,
                       featurizer.item_tokenizer)
    with pytest.raises(PreprocessedMismatchError, match="max_chunk_length: preprocessed with 32, this config needs 16"):
        check_manifest(shards.manifest, other, "train", shards.uri)
    from uue.data.tokenizers import load_tokenizer

    qwen = Featurizer(tiny_model_config.model_copy(update={"user_model_name": "tiny-qwen3"}),
                      load_tokenizer("tiny-qwen3"), featurizer.item_tokenizer)
    with pytest.raises(PreprocessedMismatchError, match="user_tokenizer: preprocessed with 'tiny"):
        check_manifest(shards.manifest, qwen, "train", shards.uri)
    with pytest.raises(PreprocessedMismatchError, match="train_split"):
        check_manifest(shards.manifest, featurizer, "validation", shards.uri)


def test_cli_trains_from_the_shards_alone_after_the_raw_folder_is_gone(tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(REPO / "uue" / "data" / "sample_data", raw)
    uue = [sys.executable, "-m", "uue.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml")]
    first = subprocess.run([*uue, f"data.path={raw}", f"training.output_dir={tmp_path / 'a'}",
                            f"data.preprocessed_dir={tmp_path / 'pre'}", "training.max_steps=1"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(raw)
    ok = subprocess.run([*uue, f"data.path={tmp_path / 'pre'}", f"training.output_dir={tmp_path / 'b'}",
                         "training.max_steps=2"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "trained 2 steps" in ok.stdout and (tmp_path / "b" / "model" / "uue.json").is_file()
    refused = subprocess.run([*uue, f"data.path={tmp_path / 'pre'}", f"training.output_dir={tmp_path / 'c'}",
                              "model.max_chunk_length=16"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and "max_chunk_length: preprocessed with 32" in refused.stderr


def test_one_item_tower_call_per_step_and_honest_token_metrics(tiny_model_config, tmp_path):
    """With semi-hard negatives and label statements, a training forward runs the item tower once, and its
    vectors equal encoding each set on its own; metrics.jsonl counts each tower's real tokens (negatives and
    label statements included) and, given a peak, MFU <= HFU (recomputation on)."""
    cfg = tiny_model_config.model_copy(update={
        "negative_sampling": "semi_hard", "num_negative_samples": 2, "label_loss_weight": 0.5,
        "labels_per_user": 3, "positives_per_user": 2, "gradient_checkpointing_chunks": True})
    trainer = UUETrainer(_experiment(cfg, tmp_path, max_steps=2, peak_tflops=1.0))
    model, samplers, objective = trainer.model, trainer.samplers, trainer.objective
    objective.refresh_negatives(0)
    batch = trainer.inputs.collate(next(iter(trainer.loop.stream.steps(0, 1))).rows, 0)
    calls = []
    handle = model.item_tower.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    objective.eval()
    state = samplers.negative.generator.get_state(), samplers.label.generator.get_state()
    with torch.no_grad():
        out = objective.encode(batch)
        handle.remove()
        assert len(calls) == 1 and calls[0] == len(batch.statement_index) + out.negatives[:, :, 0].numel() + \
            out.label_items[:, :, 0].numel()
        # The same draws again, each set through the item tower on its own.
        samplers.negative.generator.set_state(state[0])
        samplers.label.generator.set_state(state[1])
        users = model.encode_users(batch.users)
        ids, negatives = samplers.negative.sample(users, batch)
        draw = samplers.label.sample(batch, users.device)
        torch.testing.assert_close(ids, out.negative_ids)
        torch.testing.assert_close(out.item, model.encode_statements(batch.positives), atol=1e-5, rtol=1e-4)
        for statements, vectors in ((negatives, out.negatives), (draw.statements, out.label_items)):
            alone = model.encode_statements(statements)
            torch.testing.assert_close(vectors.flatten(0, 1), alone, atol=1e-5, rtol=1e-4)

    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["user_tokens"] > 0 and row["user_tokens"] <= row["tokens"]
        assert row["item_tokens"] > row["tokens"] - row["user_tokens"]  # negatives and labels ran through it too
        assert row["user_tokens_per_second"] == pytest.approx(row["user_tokens"] / row["step_seconds"], rel=1e-6)
        assert 0 < row["mfu"] < row["hfu"]
