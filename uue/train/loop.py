"""The training loop: one function for one process (uue.train.local) and Ray Train workers (uue.train.ray).

What differs between the two is handed in: the training objective (uue.train.objective, a module or inside a
DeepSpeed engine), its `Optimization`,
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

from uue.model.packing import take_pack_stats
from uue.train.profile import PhaseClock, StepProfiler
from uue.train.step import model_of, train_step, unwrap
from uue.train.stream import BatchCollator, UserStream
from uue.train.tracking import MetricTrackers


@dataclass
class TrainProbe:
    """Diagnostics a run can be asked for (tests, audits, benchmarks); none changes what is trained.

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
    data_only: bool = False
    """Stream and collate every batch but run no model step (bench/bench_data_scale.py: the data path alone)."""
    resumable_final_checkpoint: bool = True
    """False: a Ray run's last checkpoint holds the model only, not the DeepSpeed optimizer state (benchmarks:
    a large model's optimizer state takes longer to write than the steps they time)."""


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks, in one all-reduce (each is a host round trip)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def peak_flops_for(peak_tflops: float | None, device: torch.device) -> float | None:
    """training.peak_tflops in FLOP/s; on CUDA without it the H100/H200 bf16 dense peak."""
    from uue.model.flops import H100_BF16_DENSE_FLOPS

    if peak_tflops is not None:
        return peak_tflops * 1e12
    return H100_BF16_DENSE_FLOPS if device.type == "cuda" else None


@dataclass
class ThroughputMeter:
    """Useful tokens/s per tower and MFU/HFU of a step (uue.model.flops: only real tokens count).

    `peak_flops` is one device's peak; None logs no utilisation (a CPU's peak is not known here).
    """

    user_flops: tuple[float, float]
    item_flops: tuple[float, float]
    peak_flops: float | None

    @classmethod
    def for_model(cls, model: Any, peak_flops: float | None) -> ThroughputMeter:
        from uue.model.flops import training_flops_per_token

        module = model_of(model)
        recompute = module.config.towers.gradient_checkpointing_chunks
        return cls(training_flops_per_token(module.user_tower.encoder.backbone, recompute),
                   training_flops_per_token(module.item_tower.encoder.backbone, recompute), peak_flops)

    def metrics(self, user_tokens: float, item_tokens: float, seconds: float, devices: int) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        out = {"user_tokens_per_second": user_tokens / seconds, "item_tokens_per_second": item_tokens / seconds}
        if self.peak_flops:
            capacity = self.peak_flops * devices * seconds
            out["mfu"] = (user_tokens * self.user_flops[0] + item_tokens * self.item_flops[0]) / capacity
            out["hfu"] = (user_tokens * self.user_flops[1] + item_tokens * self.item_flops[1]) / capacity
        return out


def dump_gradients(model: Any, path: Path, rank: int) -> None:
    """Full averaged gradients (a collective under ZeRO-1/2: every rank calls, rank 0 writes)."""
    grads = {}
    engine = model is not unwrap(model)
    if engine:
        from deepspeed.utils import safe_get_full_grad
    for name, param in model_of(model).named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param) if engine else param.grad
            grads[name] = None if grad is None else grad.detach().float().cpu().clone()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(grads, path)


@dataclass
class Loop:
    """One process's part of a run."""

    objective: Any
    """The TrainingObjective, or the DeepSpeed engine around it."""
    optimization: Any
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
    checkpoint_last_step: bool = True
    """False where the caller writes the final checkpoint itself (Ray reports it as the run's result)."""
    epoch: int = 0
    peak_flops: float | None = None
    """One device's peak FLOP/s for MFU/HFU (training.peak_tflops; on CUDA default H100/H200 bf16 dense)."""
    profile_steps: tuple[int, int] | None = None
    """training.profile_steps: a torch.profiler trace of these steps under output_dir/profile (every rank)."""
    open_trackers: Callable[[], MetricTrackers] | None = None
    """Opens the run's TensorBoard/MLflow sinks when `run` starts (uue.train.tracking; rank 0 only): they get
    what metrics.jsonl gets and close when `run` ends."""

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
        meter = ThroughputMeter.for_model(self.objective, self.peak_flops)
        clock = PhaseClock(self.device)
        profiler = None if self.profile_steps is None else StepProfiler(
            self.profile_steps, self.log_path.parent / "profile", self.rank, self.device)
        trackers = self.open_trackers() if self.open_trackers is not None and self.rank == 0 else MetricTrackers()
        started = waited = time.perf_counter()
        for item in self.stream.steps(start_step, stop_at):
            data_seconds = time.perf_counter() - waited
            unwrap(self.objective).refresh_negatives(item.step - 1)
            collate_started = time.perf_counter()
            batch = self.collate(item.rows, item.epoch)
            clock.add("data", data_seconds + time.perf_counter() - collate_started)
            if self.probe.gradient_dump_step == item.step and self.probe.gradient_dump_dir:
                dump_to = Path(self.probe.gradient_dump_dir) / f"step_{item.step}.pt"
                self.optimization.before_step = lambda m, dump_to=dump_to: dump_gradients(m, dump_to, self.rank)
            else:
                self.optimization.before_step = None
            real_tokens, processed_tokens = batch.token_counts()
            take_pack_stats(model_of(self.objective))  # count only the step's packs (not the negatives' refresh)
            if profiler is not None:
                profiler.begin(item.step)
                clock.annotate = profiler.recording
            step_started = time.perf_counter()
            if self.probe.data_only:
                metrics = {"loss": 0.0, "accuracy": 0.0, "user_tokens": 0.0, "item_tokens": 0.0}
            else:
                with clock.measuring():
                    metrics = train_step(self.objective, batch, self.optimization)
            step_seconds = time.perf_counter() - step_started  # train_step ends reading its metrics: synced
            phase_seconds = clock.read()  # this rank's; after the step, so the CUDA events have passed
            if profiler is not None:
                profiler.end(item.step)
            local_loss = metrics["loss"]
            world = self.world_size
            packs = take_pack_stats(model_of(self.objective))
            loss_sum, user_tokens, item_tokens, real, processed, packed, pack_width = sum_across_ranks(
                [local_loss, metrics.pop("user_tokens"), metrics.pop("item_tokens"), real_tokens, processed_tokens,
                 packs.useful, packs.computed])
            if pack_width:  # packed towers: what their packs computed, and the useful share of it
                metrics.update(packed_tokens=round(pack_width), pack_fill=packed / pack_width)
            metrics.update(step=item.step, epoch=item.epoch, loss=loss_sum / world, local_loss=local_loss,
                           step_seconds=step_seconds, data_seconds=data_seconds,
                           seconds=time.perf_counter() - started, workers=world, users=len(item.rows) * world,
                           tokens=round(real), processed_tokens=round(processed),
                           user_tokens=round(user_tokens), item_tokens=round(item_tokens),
                           **meter.metrics(user_tokens, item_tokens, step_seconds, world), **phase_seconds)
            if self.device.type == "cuda":
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            history.append(metrics)
            self.epoch = item.epoch
            if batch_log is not None:
                valid = batch.item_valid
                batch_log.write(json.dumps({
                    "pid": os.getpid(), "resumed_from": start_step, "rank": self.rank, "step": item.step,
                    "epoch": item.epoch, "user_ids": [r["user_id"] for r in item.rows],
                    "statement_index": batch.statement_index[valid].tolist(),
                    "item_owner": batch.item_owner[valid].tolist(), "local_loss": local_loss,
                    "collated": self.collate.calls,
                    "node": os.environ.get("UUE_NODE_ID"),
                }) + "\n")
                batch_log.flush()
            if self.rank == 0 and (item.step % self.log_every == 0 or item.step == stop_at):
                with self.log_path.open("a") as log:
                    log.write(json.dumps(metrics) + "\n")
                trackers.log(item.step, metrics)
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
        if profiler is not None:
            profiler.close()  # a run stopped inside the profiled range still writes its trace
        trackers.close()
        return history
