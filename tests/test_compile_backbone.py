"""model.compile_backbone: the padded path of both towers runs the whole Hugging Face backbone under torch.compile
(the HF+compile peer of bench/gpu_train.py), with the same outputs, weights and state dict as the eager model."""

from __future__ import annotations

import copy

import pytest
import torch

from uue.config import ModelConfig
from uue.model import UUEModel
from uue.model.inputs import StatementBatch, TowerInput, UserBatch


def _inputs(config: ModelConfig) -> tuple[UserBatch, StatementBatch]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (2, 3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 1, 12:] = 0  # uneven lengths: the padded path's attention mask matters
    chunk_mask = torch.tensor([[True, True, True], [True, True, False]])
    statements = torch.randint(5, 200, (4, 10), generator=generator)
    statement_mask = torch.ones_like(statements)
    statement_mask[1, 6:] = 0
    return (UserBatch(TowerInput(ids, mask), chunk_mask),
            StatementBatch(TowerInput(statements, statement_mask)))


def _models(config: ModelConfig, backend: str) -> tuple[UUEModel, UUEModel]:
    eager = UUEModel.from_config(config, seed=0).eval()
    compiled = UUEModel.from_config(config.model_copy(update={"compile_backbone": True}), seed=0).eval()
    for encoder in (compiled.user_tower.encoder, compiled.item_tower.encoder):
        encoder.compile_backend = backend
    return eager, compiled


def test_the_key_compiles_both_towers_and_leaves_the_weights_alone(tiny_model_config):
    torch._dynamo.reset()
    eager, compiled = _models(tiny_model_config, "eager")  # dynamo tracing without inductor: seconds on a CPU
    assert compiled.user_tower.encoder.compiles_backbone and compiled.item_tower.encoder.compiles_backbone
    assert not eager.user_tower.encoder.compiles_backbone
    users, statements = _inputs(tiny_model_config)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_users(users), eager.encode_users(users), atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled.encode_statements(statements), eager.encode_statements(statements),
                                   atol=1e-6, rtol=0)
    assert compiled.user_tower.encoder._compiled_forward is not None  # the forward went through torch.compile
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod copies of the weights
    copied = copy.deepcopy(compiled)  # the compiled function is a cache: a copy recompiles on first use
    assert copied.user_tower.encoder.compiles_backbone and copied.user_tower.encoder._compiled_forward is None


def test_a_training_step_through_the_compiled_backbone_matches_eager(tiny_model_config, sample_batches):
    from uue.train.step import TorchOptimization, train_step

    config = tiny_model_config.model_copy(update={"dropout": 0.0})
    results = []
    for compile_backbone in (False, True):
        model = UUEModel.from_config(config.model_copy(update={"compile_backbone": compile_backbone}), seed=0)
        for encoder in (model.user_tower.encoder, model.item_tower.encoder):
            encoder.compile_backend = "eager"
        trainer, batches = sample_batches(model.config, steps=1, model=model)
        metrics = train_step(trainer.objective, batches[0], TorchOptimization(model, model.config, 4))
        results.append((metrics["loss"], metrics["grad_norm"]))
    (loss, norm), (compiled_loss, compiled_norm) = results
    assert compiled_loss == pytest.approx(loss, abs=1e-5) and compiled_norm == pytest.approx(norm, abs=1e-4)


def test_compile_backbone_is_for_the_padded_path():
    with pytest.raises(ValueError, match="compile_layers"):
        ModelConfig(user_model_name="tiny", item_model_name="tiny", attention="packed", compile_backbone=True)


@pytest.mark.slow
def test_inductor_compiled_forward_equals_eager(tiny_model_config):
    """What a GPU run compiles with (inductor), here on the CPU: about a minute of compiling on 2 cores."""
    torch._dynamo.reset()
    eager, compiled = _models(tiny_model_config, "inductor")
    users, statements = _inputs(tiny_model_config)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_users(users), eager.encode_users(users), atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled.encode_statements(statements), eager.encode_statements(statements),
                                   atol=1e-5, rtol=0)
