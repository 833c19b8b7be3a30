"""One optimisation step, the parameter groups and the schedule: the same for one process and Ray workers.

`train_step` is the whole of a step. It takes the model (a plain module or a DeepSpeed engine), a collated
user-row batch, the loss, and an `Optimization` that knows how to backward and step: `TorchOptimization`
(AdamW + schedule + clipping) in one process, `DeepSpeedOptimization` (the engine's) on Ray.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from uue.config import ModelConfig
from uue.distill import AnchorSampler, distillation_loss
from uue.label_loss import UserLabelSampler, label_loss
from uue.loss import InfoNCELoss
from uue.model.uue_model import UUEModel
from uue.negatives import NegativeSampler


def param_groups(model: UUEModel, config: ModelConfig) -> list[dict]:
    """Per-tower learning rates ("separate optimizers" of the original design) in one optimizer.

    Backbones learn slowly (pretrained), heads (pooling, metadata fusion, projections, temperature)
    faster; biases, norms, the pooling queries and the temperature get no weight decay.
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
        no_decay = param.ndim < 2 or name.endswith((".query", ".queries")) or name == "logit_scale"
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
    """How a step's loss becomes an update: torch (below) or a DeepSpeed engine."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float | torch.Tensor: ...

    def learning_rates(self) -> dict[str, float]: ...


class TorchOptimization:
    """AdamW + warmup/cosine schedule + gradient clipping around a plain module."""

    kind = "torch"

    def __init__(self, model: UUEModel, config: ModelConfig, total_steps: int):
        self.model = model
        self.max_grad_norm = config.max_grad_norm
        self.optimizer = torch.optim.AdamW(param_groups(model, config), betas=(0.9, 0.98), eps=1e-6)
        schedule = warmup_cosine(total_steps, config.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.before_step: Callable[[Any], None] | None = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, update, schedule; returns the gradient norm as a tensor (read with the step's metrics)."""
        if self.before_step is not None:
            self.before_step(self.model)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm).detach()
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params])).detach() if params else torch.zeros(())
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


class DeepSpeedOptimization:
    """`Optimization` around a DeepSpeed engine: backward, clip and step are the engine's."""

    kind = "deepspeed"

    def __init__(self, engine: Any):
        self.engine = engine
        self.before_step: Callable[[Any], None] | None = None
        """Called with the engine after backward, before the update (gradients are complete then)."""

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        if self.before_step is not None:
            self.before_step(self.engine)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", f"group{i}"): float(g["lr"]) for i, g in enumerate(self.engine.optimizer.param_groups)}


def unwrap(model: nn.Module) -> UUEModel:
    """The UUEModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)  # type: ignore[return-value]


def autocast_for(device: torch.device, model: nn.Module | None = None):
    """bf16 autocast on CUDA; none on CPU (bf16 matmuls are slow and inexact there), and none over weights
    already in bf16 (a DeepSpeed bf16 engine): autocast would only add casts around every op."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if model is not None and next(unwrap(model).parameters()).dtype == torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def backbone_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(user, item) tokens the two backbones run on for the batch's own chunks and statements, from the host
    batch; cached vectors (frozen backbones) mean no backbone work."""
    user = int(batch["user_attention_mask"].sum()) if "user_attention_mask" in batch and \
        "chunk_vectors" not in batch and "chunk_hidden" not in batch else 0
    item = int(batch["item_attention_mask"].sum()) if "item_attention_mask" in batch and \
        "item_text_vectors" not in batch and "item_hidden" not in batch else 0
    return user, item


def refresh_negatives(model: nn.Module, sampler: NegativeSampler | None, step: int, device: torch.device) -> None:
    """Re-encode the statement pool for hard/semi-hard negatives when due (through the model's forward)."""
    if sampler is None or not sampler.needs_refresh(step):
        return
    was_training = model.training
    model.eval()
    with autocast_for(device, model):
        sampler.refresh(lambda b: model({k: v.to(device) for k, v in b.items()}, task="items"), step)
    model.train(was_training)


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: InfoNCELoss,
    optimization: Optimization,
    negative_sampler: NegativeSampler | None = None,
    label_sampler: UserLabelSampler | None = None,
    anchor_sampler: AnchorSampler | None = None,
) -> dict[str, float]:
    """One optimisation step on one user-row batch: forward (each history encoded once), symmetric InfoNCE
    over the users' positive slots (+ the weighted label loss when a label sampler is given), backward,
    clip, step."""
    device = next(unwrap(model).parameters()).device
    user_tokens, item_tokens = backbone_tokens(batch)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    model.train()
    with autocast_for(device, model):
        out = model(batch, negative_sampler=negative_sampler, label_sampler=label_sampler,
                    anchor_sampler=anchor_sampler)
        loss, metrics = loss_fn(out, batch)
        if out.label_items is not None:
            pointwise = label_loss(out.user, out.label_items, out.label_values, out.label_mask, out.logit_scale,
                                   out.label_bias)
            metrics["info_nce"] = loss.detach()
            metrics["label_loss"] = pointwise.detach()
            loss = loss + unwrap(model).config.label_loss_weight * pointwise
        if out.anchors is not None:
            kept = distillation_loss(out.user, out.anchors, out.teacher_users, out.teacher_anchors)
            metrics["distill_loss"] = kept.detach()
            loss = loss + unwrap(model).config.distill_weight * kept
    optimization.backward(loss)
    grad_norm = optimization.step()
    unwrap(model).clamp_logit_scale_()
    # Every metric leaves the device in one copy (the step's one host sync besides packing's lengths).
    names = ["loss", "grad_norm", *metrics, "extra_item_tokens"]
    values = [loss.detach(), grad_norm, *metrics.values(), getattr(unwrap(model), "extra_item_tokens", 0)]
    host = torch.stack([torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32,
                                        device=device).reshape(()) for v in values]).tolist()
    result = dict(zip(names, host, strict=True))
    result["user_tokens"] = float(user_tokens)
    result["item_tokens"] = float(item_tokens) + result.pop("extra_item_tokens")
    result.update({f"lr/{k}": v for k, v in optimization.learning_rates().items()})
    return result
