"""Two gloo processes with local batch b == one process with the concatenated batch 2b: loss and gradients.

This is the property that makes cross-worker negatives correct: each rank scores its rows against every
rank's columns (gathered with gradient), and averaging the ranks' gradients gives the big-batch gradient.
Batches are user-centric with several positives per user (statements shared between users, users with
fewer positives than slots), so the false-negative masks must also be right across ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import slice_users

from uue.config import ModelConfig
from uue.model import UUEModel
from uue.train.loss import InfoNCELoss
from uue.train.negatives import NegativeSampler
from uue.train.objective import TrainingObjective
from uue.train.samplers import Samplers

WORLD = 2
BATCH = 8
PER_USER = 5  # sample users have 4 training positives: every user has an unused (invalid) slot


def _config() -> ModelConfig:
    return ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4,
                       max_chunk_length=32, max_statement_length=16, max_context_length=8, num_chunks_per_user=8,
                       dropout=0.0, num_negative_samples=2, negative_sampling="hard", batch_size=BATCH,
                       positives_per_user=PER_USER)


def _loss_and_grads(data_file: str, rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
    """Build the (seeded, identical) model, take `rows` users of the batch, return loss and gradients."""
    config = _config()
    data = torch.load(data_file, weights_only=False)
    model = UUEModel.from_config(config, seed=3)
    batch = slice_users(data["batch"], rows)
    sampler = NegativeSampler("hard", config.num_negative_samples, data["pool"])
    objective = TrainingObjective(model, config, Samplers(negative=sampler))
    objective.refresh_negatives(0)  # hard negatives: same pool vectors everywhere
    objective.train()
    out = objective.encode(batch)
    loss, _ = InfoNCELoss()(out, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _worker(rank: int, data_file: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    local = BATCH // WORLD
    loss, grads = _loss_and_grads(data_file, slice(rank * local, (rank + 1) * local))
    loss_t = torch.tensor([loss])
    dist.all_reduce(loss_t)
    for g in grads.values():
        dist.all_reduce(g)  # what DDP/DeepSpeed do: average gradients across ranks
        g /= WORLD
    if rank == 0:
        torch.save({"loss": float(loss_t) / WORLD, "grads": grads}, out_file)
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(sample_batches, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trainer, (batch,) = sample_batches(_config())
    # The batch really has what the masks are for: a statement positive for users on both ranks, and slots
    # beyond a user's positives.
    half = BATCH // WORLD * PER_USER
    valid, statements = batch.item_valid, batch.statement_index
    assert set(statements[:half][valid[:half]].tolist()) & set(statements[half:][valid[half:]].tolist())
    assert not bool(valid.all()) and int(valid.view(BATCH, PER_USER).sum(1).max()) == 4
    data_file = tmp_path / "batch.pt"
    torch.save({"batch": batch, "pool": trainer.inputs.statements}, data_file)

    out_file = tmp_path / "distributed.pt"
    mp.spawn(_worker, args=(str(data_file), str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    distributed = torch.load(out_file)
    loss, grads = _loss_and_grads(str(data_file), slice(0, BATCH))
    assert distributed["loss"] == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == distributed["grads"].keys()
    assert "logit_scale" in grads and any(n.startswith("user_tower.encoder") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
