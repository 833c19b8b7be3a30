"""Two gloo processes with local batch b == one process with the concatenated batch 2b: loss and gradients.

This is the property that makes cross-worker negatives correct: each rank scores its rows against every
rank's columns (gathered with gradient), and averaging the ranks' gradients gives the big-batch gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uue.config import ModelConfig
from uue.data.featurize import Featurizer
from uue.data.pairs import PairBatches
from uue.data.readers import load_dataset
from uue.loss import InfoNCELoss
from uue.model import UUEModel
from uue.negatives import NegativeSampler
from uue.training import refresh_negatives

WORLD = 2
BATCH = 8


def _config() -> ModelConfig:
    return ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4,
                       max_chunk_length=32, max_statement_length=16, max_context_length=8, num_chunks_per_user=8,
                       dropout=0.0, num_negative_samples=2, negative_sampling="hard")


def _loss_and_grads(data_dir: str, rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
    """Build the (seeded, identical) model, take rows of the first batch, return loss and gradients."""
    config = _config()
    model = UUEModel.from_config(config, seed=3)
    batches = PairBatches(load_dataset(data_dir), Featurizer(config, model.user_tokenizer, model.item_tokenizer),
                          BATCH, seed=1)
    batch = {k: v[rows] for k, v in batches.batch(0, 0).items()}
    sampler = NegativeSampler("hard", config.num_negative_samples, batches.statement_features,
                              batches.positives_by_user())
    refresh_negatives(model, sampler, 0, torch.device("cpu"))  # hard negatives: same pool vectors everywhere
    model.train()
    out = model(batch, negative_sampler=sampler)
    loss, _ = InfoNCELoss()(out, batch["user_index"], batch["statement_index"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _worker(rank: int, data_dir: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    local = BATCH // WORLD
    loss, grads = _loss_and_grads(data_dir, slice(rank * local, (rank + 1) * local))
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
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(sample_data_dir, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_file = tmp_path / "distributed.pt"
    mp.spawn(_worker, args=(str(sample_data_dir), str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    distributed = torch.load(out_file)
    loss, grads = _loss_and_grads(str(sample_data_dir), slice(0, BATCH))
    assert distributed["loss"] == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == distributed["grads"].keys()
    assert "logit_scale" in grads and any(n.startswith("user_tower.encoder") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
