"""The training loop: one function for one process (uue.train.local) and Ray Train workers (uue.train.ray).

What differs between the two is handed in: the model (a module or a DeepSpeed engine), its `Optimization`,
the rows each process streams, and how a checkpoint is written (a folder under output_dir, or a folder
reported to Ray Train). Everything else -- refresh negatives, collate, step, log, checkpoint every N steps
-- is here once (nanoGPT: distribution is a branch, not a second loop).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from uue.loss import InfoNCELoss
from uue.train.samplers import Samplers
from uue.train.step import refresh_negatives, train_step, unwrap
from uue.train.stream import BatchCollator, UserStream


@dataclass
class TrainProbe:
    """Diagnostics a run can be asked for (tests, audits); none changes what is trained.

    batch_log_dir:      each rank appends (step, epoch, user ids, statement indices, loss, node) per step to
                        rank_R.jsonl there: the audit trail of which data every step used.
    gradient_dump_step: at this step rank 0 saves the full averaged gradient (before clipping and the
                        update) of every parameter to gradient_dump_dir/step_S.pt.
    weights_dump_dir:   at the end rank 0 saves the engine's full weights gathered with
                        `deepspeed.zero.GatheredParameters` (independently of the export path).
    fail_at_step / fail_rank / fail_marker: chaos test -- that rank's process exits abruptly right after
                        that step, once (the marker file records that it already happened).
    """

    batch_log_dir: str | None = None
    gradient_dump_step: int | None = None
    gradient_dump_dir: str | None = None
    weights_dump_dir: str | None = None
    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_marker: str | None = None


def mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, tokens the encoders process, padding included) in one local batch."""
    real = processed = 0
    if "user_attention_mask" in batch:
        real += int(batch["user_attention_mask"].sum())
        processed += int(batch["chunk_mask"].sum()) * batch["user_attention_mask"].shape[-1]
    if "item_attention_mask" in batch:
        real += int(batch["item_attention_mask"].sum())
        processed += batch["item_attention_mask"].numel()
    return real, processed


def dump_gradients(model: Any, path: Path, rank: int) -> None:
    """Full averaged gradients (a collective under ZeRO-1/2: every rank calls, rank 0 writes)."""
    grads = {}
    engine = model is not unwrap(model)
    if engine:
        from deepspeed.utils import safe_get_full_grad
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param) if engine else param.grad
            grads[name] = None if grad is None else grad.detach().float().cpu().clone()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(grads, path)


@dataclass
class Loop:
    """One process's part of a run."""

    model: Any
    optimization: Any
    samplers: Samplers
    collate: BatchCollator
    stream: UserStream
    device: torch.device
    total_steps: int
    log_path: Path
    log_every: int
    checkpoint_every: int | None
    save_checkpoint: Callable[[int, int, dict[str, Any]], None]
    """(step, epoch, metrics): write (and on Ray report) a resumable checkpoint of this step."""
    rank: int = 0
    world_size: int = 1
    probe: TrainProbe = field(default_factory=TrainProbe)
    after_step: Callable[[int, dict[str, Any]], None] | None = None
    progress: bool = False
    loss_fn: InfoNCELoss = field(default_factory=InfoNCELoss)
    checkpoint_last_step: bool = True
    """False where the caller writes the final checkpoint itself (Ray reports it as the run's result)."""
    epoch: int = 0

    def run(self, start_step: int, stop_at: int | None = None) -> list[dict[str, Any]]:
        """Train steps start_step+1 .. stop_at (default: total_steps); returns their metrics."""
        stop_at = min(stop_at or self.total_steps, self.total_steps)
        history: list[dict[str, Any]] = []
        if self.rank == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        batch_log = None
        if self.probe.batch_log_dir:
            Path(self.probe.batch_log_dir).mkdir(parents=True, exist_ok=True)
            batch_log = (Path(self.probe.batch_log_dir) / f"rank_{self.rank}.jsonl").open("a")
        bar = tqdm(total=stop_at, initial=start_step, desc="train", unit="step", disable=not self.progress)
        started = waited = time.perf_counter()
        for item in self.stream.steps(start_step, stop_at):
            data_seconds = time.perf_counter() - waited
            refresh_negatives(self.model, self.samplers.negative, item.step - 1, self.device)
            batch = self.collate(item.rows, item.epoch)
            if self.probe.gradient_dump_step == item.step and self.probe.gradient_dump_dir:
                dump_to = Path(self.probe.gradient_dump_dir) / f"step_{item.step}.pt"
                self.optimization.before_step = lambda m, dump_to=dump_to: dump_gradients(m, dump_to, self.rank)
            else:
                self.optimization.before_step = None
            real_tokens, processed_tokens = batch_tokens(batch)
            step_started = time.perf_counter()
            metrics = train_step(self.model, batch, self.loss_fn, self.optimization, self.samplers.negative,
                                 self.samplers.label)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            local_loss = metrics["loss"]
            world = self.world_size
            metrics.update(step=item.step, epoch=item.epoch, loss=mean_across_ranks(local_loss), local_loss=local_loss,
                           step_seconds=time.perf_counter() - step_started, data_seconds=data_seconds,
                           seconds=time.perf_counter() - started, workers=world, users=len(item.rows) * world,
                           tokens=round(mean_across_ranks(real_tokens) * world),
                           processed_tokens=round(mean_across_ranks(processed_tokens) * world))
            if self.device.type == "cuda":
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            history.append(metrics)
            self.epoch = item.epoch
            if batch_log is not None:
                valid = batch["item_valid"]
                batch_log.write(json.dumps({
                    "pid": os.getpid(), "resumed_from": start_step, "rank": self.rank, "step": item.step,
                    "epoch": item.epoch, "user_ids": [r["user_id"] for r in item.rows],
                    "statement_index": batch["statement_index"][valid].tolist(),
                    "item_owner": batch["item_owner"][valid].tolist(), "local_loss": local_loss,
                    "collated": self.collate.calls,
                    "node": os.environ.get("UUE_NODE_ID"),
                }) + "\n")
                batch_log.flush()
            if self.rank == 0 and (item.step % self.log_every == 0 or item.step == stop_at):
                with self.log_path.open("a") as log:
                    log.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
            if self.after_step is not None:
                self.after_step(item.step, metrics)
            if self.checkpoint_every and item.step % self.checkpoint_every == 0 and (
                    self.checkpoint_last_step or item.step < self.total_steps):
                self.save_checkpoint(item.step, item.epoch, metrics)
            waited = time.perf_counter()
        bar.close()
        if batch_log is not None:
            batch_log.close()
        return history
