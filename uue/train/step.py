"""One optimisation step, the parameter groups and the schedule: the same for one process and Ray workers.

`train_step` is the whole of a step. It takes the training objective (uue.train.objective, a plain module or
inside a DeepSpeed engine), a collated user-row batch, and an `Optimization` that knows how to backward and
step: `TorchOptimization` (AdamW + schedule + clipping) in one process, `DeepSpeedOptimization` (the
engine's) on Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from uue.config import ModelConfig
from uue.model.uue_model import UUEModel
from uue.train.objective import TrainingObjective, autocast_for
from uue.train.profile import phase
from uue.train.stream import TrainBatch


def param_groups(model: UUEModel, config: ModelConfig) -> list[dict]:
    """Per-tower learning rates ("separate optimizers" of the original design) in one optimizer.

    Backbones learn slowly (pretrained), heads (pooling, metadata fusion, projections, temperature)
    faster; biases, norms, the pooling queries and the temperature get no weight decay.
    """
    optim = config.optim
    rates = {
        "user_backbone": optim.user_learning_rate or optim.learning_rate,
        "item_backbone": optim.item_learning_rate or optim.learning_rate,
        "head": optim.effective_head_learning_rate,
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
        {"params": params, "lr": rates[kind], "weight_decay": 0.0 if no_decay else optim.weight_decay,
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
        self.max_grad_norm = config.optim.max_grad_norm
        self.optimizer = torch.optim.AdamW(param_groups(model, config), betas=(0.9, 0.98), eps=1e-6)
        schedule = warmup_cosine(total_steps, config.optim.warmup_ratio)
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


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine (or the module itself)."""
    return getattr(module, "module", module)


def model_of(module: nn.Module) -> UUEModel:
    """The UUEModel inside a training objective, a DeepSpeed engine around one, or the model itself."""
    inner = unwrap(module)
    return inner.model if isinstance(inner, TrainingObjective) else inner  # type: ignore[return-value]


def train_step(objective: nn.Module, batch: TrainBatch, optimization: Optimization) -> dict[str, float]:
    """One optimisation step on one user-row batch: the objective's forward (each history encoded once; InfoNCE
    over the users' positive slots + the weighted label loss), backward, clip, step."""
    model = model_of(objective)
    device = next(model.parameters()).device
    user_tokens, item_tokens = batch.backbone_tokens()
    with phase("to_device"):
        batch = batch.to(device, non_blocking=True)
    objective.train()
    with autocast_for(device, unwrap(objective)):
        loss, metrics = objective(batch)  # phases user_tower, item_tower, loss (uue.train.objective)
    with phase("backward"):
        optimization.backward(loss)
    with phase("optimizer"):
        grad_norm = optimization.step()
        model.clamp_logit_scale_()
    # Every metric leaves the device in one copy (the step's one host sync besides packing's lengths).
    names = ["loss", "grad_norm", *metrics]
    values = [loss.detach(), grad_norm, *metrics.values()]
    host = torch.stack([torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32,
                                        device=device).reshape(()) for v in values]).tolist()
    result = dict(zip(names, host, strict=True))
    result["user_tokens"] = float(user_tokens)
    result["item_tokens"] = float(item_tokens) + result.pop("extra_item_tokens")
    result.update({f"lr/{k}": v for k, v in optimization.learning_rates().items()})
    return result
