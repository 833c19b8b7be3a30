"""The training step, the optimizer/schedule, and the single-process trainer with checkpoints.

`train_step` is the whole of one optimisation step and is what a Ray Train worker calls as it is: it
takes the model (a plain module or a DeepSpeed engine), a batch, the loss, and an `Optimization` that
knows how to backward and step (torch here, DeepSpeed in uue.ray_train).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from uue.config import ExperimentConfig, ModelConfig
from uue.data.featurize import Featurizer, trim_batch
from uue.data.pairs import BatchPosition, PairBatches
from uue.data.readers import UUEDataset, load_dataset
from uue.label_loss import UserLabelSampler, label_loss
from uue.loss import InfoNCELoss
from uue.model.uue_model import UUEModel
from uue.negatives import NegativeSampler

TRAINING_STATE = "training_state.pt"


# ---------------------------------------------------------------------------------- optimisation
def param_groups(model: UUEModel, config: ModelConfig) -> list[dict]:
    """Per-tower learning rates ("separate optimizers" of the original design) in one optimizer.

    Backbones learn slowly (pretrained), heads (pooling, metadata fusion, projections, temperature)
    faster; biases, norms, the pooling query and the temperature get no weight decay.
    """
    rates = {
        "user_backbone": config.user_learning_rate or config.learning_rate,
        "item_backbone": config.item_learning_rate or config.learning_rate,
        "head": config.effective_head_learning_rate,
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("user_tower.encoder."):
            kind = "user_backbone"
        elif name.startswith("item_tower.encoder."):
            kind = "item_backbone"
        else:
            kind = "head"
        no_decay = param.ndim < 2 or name.endswith(".query") or name == "logit_scale"
        groups.setdefault((kind, no_decay), []).append(param)
    return [
        {"params": params, "lr": rates[kind], "weight_decay": 0.0 if no_decay else config.weight_decay,
         "name": f"{kind}{'_no_decay' if no_decay else ''}"}
        for (kind, no_decay), params in sorted(groups.items())
    ]


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Optimization(Protocol):
    """How a step's loss becomes an update: torch (below) or a DeepSpeed engine (uue.ray_train)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...

    def learning_rates(self) -> dict[str, float]: ...


class TorchOptimization:
    """AdamW + warmup/cosine schedule + gradient clipping around a plain module."""

    def __init__(self, model: UUEModel, config: ModelConfig, total_steps: int):
        self.model = model
        self.max_grad_norm = config.max_grad_norm
        self.optimizer = torch.optim.AdamW(param_groups(model, config), betas=(0.9, 0.98), eps=1e-6)
        schedule = warmup_cosine(total_steps, config.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def unwrap(model: nn.Module) -> UUEModel:
    """The UUEModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)  # type: ignore[return-value]


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU, where bf16 matmuls are slow and inexact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def refresh_negatives(model: nn.Module, sampler: NegativeSampler | None, step: int, device: torch.device) -> None:
    """Re-encode the statement pool for hard/semi-hard negatives when due (through the model's forward)."""
    if sampler is None or not sampler.needs_refresh(step):
        return
    was_training = model.training
    model.eval()
    with autocast_for(device):
        sampler.refresh(lambda b: model({k: v.to(device) for k, v in b.items()}, task="items"), step)
    model.train(was_training)


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: InfoNCELoss,
    optimization: Optimization,
    negative_sampler: NegativeSampler | None = None,
    label_sampler: UserLabelSampler | None = None,
) -> dict[str, float]:
    """One optimisation step on one batch: forward, symmetric InfoNCE (+ the weighted label loss when a
    label sampler is given), backward, clip, step."""
    device = next(unwrap(model).parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in trim_batch(batch).items()}
    model.train()
    with autocast_for(device):
        out = model(batch, negative_sampler=negative_sampler, label_sampler=label_sampler)
        loss, metrics = loss_fn(out, batch["user_index"], batch["statement_index"])
        if out.label_items is not None:
            pointwise = label_loss(out.user, out.label_items, out.label_values, out.label_mask, out.logit_scale,
                                   out.label_bias)
            metrics["info_nce"] = loss.detach()
            metrics["label_loss"] = pointwise.detach()
            loss = loss + unwrap(model).config.label_loss_weight * pointwise
    optimization.backward(loss)
    grad_norm = optimization.step()
    unwrap(model).clamp_logit_scale_()
    result = {"loss": float(loss.detach()), "grad_norm": grad_norm}
    result.update({k: float(v) for k, v in metrics.items()})
    result.update({f"lr/{k}": v for k, v in optimization.learning_rates().items()})
    return result


# ---------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    model_dir: Path | None = None
    last_checkpoint: Path | None = None


def wants_negative_sampler(config: ModelConfig) -> bool:
    return config.negative_sampling != "none" and config.num_negative_samples > 0


def wants_samplers(config: ModelConfig) -> bool:
    """Whether the config uses any statement sampler (and so needs the statement pool's features)."""
    return wants_negative_sampler(config) or config.label_loss_weight > 0


@dataclass
class Samplers:
    """The statement samplers of one training process: sampled negatives and the label loss's draws."""

    negative: NegativeSampler | None = None
    label: UserLabelSampler | None = None

    def state_dict(self) -> dict[str, dict | None]:
        """Keys as stored in training states and Ray Train rank files."""
        return {"negative_sampler": self.negative.state_dict() if self.negative else None,
                "label_sampler": self.label.state_dict() if self.label else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore the samplers the state has (a state from before the label loss has no label_sampler)."""
        if self.negative and state.get("negative_sampler"):
            self.negative.load_state_dict(state["negative_sampler"])
        if self.label and state.get("label_sampler"):
            self.label.load_state_dict(state["label_sampler"])


def build_samplers(config: ModelConfig, pool_features: dict[str, np.ndarray], positives: dict[int, set[int]],
                   labels: dict[int, list[tuple[int, int]]], seed: int) -> Samplers:
    """The samplers the config turns on, over the statement pool (positions index `pool_features`).

    `positives` and `labels` ((statement, 0/1) per user) come from the training split; the label-0 statements
    are the `labeled` strategy's known negatives. The single-process trainer and Ray Train workers both build
    them here, so the two paths sample alike.
    """
    samplers = Samplers()
    if wants_negative_sampler(config):
        known = ({u: {s for s, value in pairs if value == 0} for u, pairs in labels.items()}
                 if config.negative_sampling == "labeled" else None)
        samplers.negative = NegativeSampler(
            config.negative_sampling, config.num_negative_samples, pool_features, positives,
            margin=config.semi_hard_margin, refresh_steps=config.negative_refresh_steps, seed=seed,
            known_negatives=known)
    if config.label_loss_weight > 0:
        samplers.label = UserLabelSampler(labels, config.labels_per_user, pool_features, seed=seed + 7919)
    return samplers


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folder = Path(output_dir) / "checkpoints"
    found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
    found = [p for p in found if (p / TRAINING_STATE).is_file()]
    return found[-1] if found else None


class UUETrainer:
    """Single-process training: the CPU default and the reference the Ray path must match.

    `fit()` trains for `training.max_steps` (or `model.num_epochs` epochs), writes checkpoints
    (model folder + training state) every `training.checkpoint_every_steps`, and exports the final
    model to `output_dir/model`. `fit(resume_from=...)` continues a run exactly where it stopped.
    """

    def __init__(self, config: ExperimentConfig | ModelConfig, dataset: UUEDataset | None = None,
                 model: UUEModel | None = None, device: str | torch.device | None = None):
        self.config = config if isinstance(config, ExperimentConfig) else ExperimentConfig(model=config)
        self.dataset = dataset if dataset is not None else load_dataset(self.config.data.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        seed = self.config.training.seed
        torch.manual_seed(seed)
        self.model = (model or UUEModel.from_config(self.config.model, seed=seed)).to(self.device)
        self.featurizer = Featurizer(self.config.model, self.model.user_tokenizer, self.model.item_tokenizer)
        self.chunk_cache = None
        if self.config.model.cache_chunk_vectors:
            from uue.chunk_cache import ChunkVectorCache

            self.chunk_cache = ChunkVectorCache(self.model.user_tower.encoder, self.featurizer, self.device,
                                                progress=self.config.training.progress_bar)
        elif self.config.model.hidden_cache_layers("user"):  # top-N blocks train on hidden states at the cut
            from uue.chunk_cache import HiddenStateCache

            self.chunk_cache = HiddenStateCache(
                self.model.user_tower.encoder, self.featurizer, self.model.user_tower.hidden_cut, self.device,
                getattr(torch, self.config.model.hidden_cache_dtype), progress=self.config.training.progress_bar)
        self.batches = PairBatches(self.dataset, self.featurizer, self.config.model.batch_size,
                                   split=self.config.data.train_split, seed=self.config.data.shuffle_seed,
                                   user_features=self.chunk_cache.features if self.chunk_cache else None)
        if self.chunk_cache is not None:
            self.chunk_cache.precompute(self.batches.users_in_pairs(), desc="user chunk vectors (frozen backbone)")
        if self.config.model.cache_statement_vectors:
            from uue.chunk_cache import statement_vector_features

            self.batches.statement_features = statement_vector_features(
                self.model.item_tower.encoder, self.batches.statement_features, device=self.device)
        elif self.config.model.hidden_cache_layers("item"):
            from uue.chunk_cache import statement_hidden_features

            self.batches.statement_features = statement_hidden_features(
                self.model.item_tower.encoder, self.batches.statement_features, self.model.item_tower.hidden_cut,
                device=self.device, dtype=getattr(torch, self.config.model.hidden_cache_dtype))
        epochs_steps = self.config.model.num_epochs * self.batches.batches_per_epoch
        self.total_steps = self.config.training.max_steps or epochs_steps
        self.optimization = TorchOptimization(self.model, self.config.model, self.total_steps)
        self.loss_fn = InfoNCELoss()
        self.samplers = build_samplers(self.config.model, self.batches.statement_features,
                                       self.batches.positives_by_user(), self.batches.labels_by_user(), seed)
        self.output_dir = Path(self.config.training.output_dir)
        self.step = 0
        self.position = BatchPosition(0, 0)

    # -- checkpoints
    def save_checkpoint(self, folder: str | Path | None = None) -> Path:
        folder = Path(folder) if folder else self.output_dir / "checkpoints" / f"step_{self.step:06d}"
        self.model.save_pretrained(folder / "model")
        torch.save({
            "step": self.step, "epoch": self.position.epoch, "batch_in_epoch": self.position.batch_in_epoch,
            "optimization": self.optimization.state_dict(), "rng": _rng_state(),
            **self.samplers.state_dict(),
            "config": self.config.model_dump(),
        }, folder / TRAINING_STATE)
        self._prune_checkpoints()
        return folder

    def _prune_checkpoints(self) -> None:
        folder = self.output_dir / "checkpoints"
        if not folder.is_dir():
            return
        found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in found[: -self.config.training.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        loaded = UUEModel.from_pretrained(folder / "model", map_location=self.device)
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
        self.optimization.load_state_dict(state["optimization"])
        self.samplers.load_state_dict(state)
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.position = BatchPosition(state["epoch"], state["batch_in_epoch"])

    # -- loop
    def fit(self, resume_from: str | Path | None = None, max_steps: int | None = None) -> TrainResult:
        """Train until `max_steps` (default: the configured total); `resume_from="latest"` finds the last checkpoint."""
        if resume_from == "latest":
            resume_from = latest_checkpoint(self.output_dir)
        if resume_from:
            self.load_checkpoint(resume_from)
        stop_at = min(max_steps or self.total_steps, self.total_steps)
        cfg = self.config.training
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "metrics.jsonl"
        result = TrainResult(steps=self.step)
        last_checkpoint = None
        progress = tqdm(total=stop_at, initial=self.step, desc="train", disable=not cfg.progress_bar, unit="step")
        stream = self.batches.iterate(self.position)
        started = time.perf_counter()
        with log_path.open("a") as log:
            while self.step < stop_at:
                refresh_negatives(self.model, self.samplers.negative, self.step, self.device)
                position, batch = next(stream)
                metrics = train_step(self.model, batch, self.loss_fn, self.optimization, self.samplers.negative,
                                     self.samplers.label)
                self.step += 1
                nxt = position.batch_in_epoch + 1
                self.position = (BatchPosition(position.epoch, nxt) if nxt < self.batches.batches_per_epoch
                                 else BatchPosition(position.epoch + 1, 0))
                metrics.update(step=self.step, epoch=position.epoch, seconds=time.perf_counter() - started)
                result.history.append(metrics)
                if self.step % cfg.log_every_steps == 0 or self.step == stop_at:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
                if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                    last_checkpoint = self.save_checkpoint()
        progress.close()
        result.steps = self.step
        result.last_checkpoint = last_checkpoint
        if self.step >= self.total_steps:
            result.model_dir = self.model.save_pretrained(self.output_dir / "model")
        return result

    def train(self, max_steps: int | None = None) -> TrainResult:
        """Seed-API name for `fit`."""
        return self.fit(max_steps=max_steps)
