"""One checkpoint layout for one process and Ray Train workers, whatever the optimizer.

    step_000006/
        model/                 the UUE model folder (full weights; gathered from the shards under ZeRO-3),
                               loadable on its own like the exported model
        training_state.json    step, epoch, total steps, world size, optimizer kind, ZeRO stage, resumable
        optimizer/torch.pt     one process: torch optimizer + schedule
        optimizer/deepspeed/   Ray workers: every rank's DeepSpeed engine state (`engine.save_checkpoint`)
        ranks/rank_R.pt        each rank's RNG and sampler state

Resuming restores all of it and continues at the next step; which data that step reads follows from the
step number alone (uue.train.stream), so nothing else needs saving.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uue.model.uue_model import UUEModel
from uue.train.samplers import Samplers
from uue.train.step import model_of, unwrap

STATE_FILE = "training_state.json"
MODEL_FOLDER = "model"
OPTIMIZER_FOLDER = "optimizer"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a module or of the model inside a DeepSpeed engine, whatever the ZeRO stage
    (under DeepSpeed a collective: all ranks call).

    Trained parameters come from the optimizer's fp32 master copy (`safe_get_full_fp32_param`), so a bf16
    run exports fp32 like the single-process path; frozen ZeRO-3 parameters are gathered from their shards.
    """
    module = model_of(model)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if unwrap(model) is model:  # not a DeepSpeed engine
        return state
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
                full = param.data.detach().clone()
        state[name] = full.detach().float().cpu().clone()
    return state


def write_checkpoint(folder: Path, *, model: Any, optimization: Any, samplers: Samplers, step: int, epoch: int,
                     total_steps: int, rank: int = 0, world_size: int = 1, resumable: bool = True) -> Path:
    """Every rank writes its optimizer shard (DeepSpeed) and RNG state; rank 0 the model and the state file."""
    folder.mkdir(parents=True, exist_ok=True)
    kind = optimization.kind
    if resumable and kind == "deepspeed":
        model.save_checkpoint(str(folder / OPTIMIZER_FOLDER / "deepspeed"), tag=f"step_{step}")
    weights = full_state_dict(model)
    (folder / "ranks").mkdir(exist_ok=True)
    torch.save({"rng": rng_state(), **samplers.state_dict()}, folder / "ranks" / f"rank_{rank}.pt")
    if rank == 0:
        model_of(model).save_pretrained(folder / MODEL_FOLDER, state_dict=weights)
        if resumable and kind == "torch":
            (folder / OPTIMIZER_FOLDER).mkdir(exist_ok=True)
            torch.save(optimization.state_dict(), folder / OPTIMIZER_FOLDER / "torch.pt")
        (folder / STATE_FILE).write_text(json.dumps({
            "step": step, "epoch": epoch, "total_steps": total_steps, "world_size": world_size,
            "optimizer": kind, "zero_stage": zero_stage(model), "resumable": resumable,
        }, indent=2))
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a training checkpoint")
    return json.loads(path.read_text())


def restore_checkpoint(folder: Path, *, model: Any, optimization: Any, samplers: Samplers, rank: int = 0) -> int:
    """Load a checkpoint into the model/engine, optimizer, samplers and RNG; returns its step."""
    folder = Path(folder)
    state = read_state(folder)
    step = int(state["step"])
    if not state.get("resumable", True):
        raise RuntimeError(f"checkpoint {folder} holds the model only (TrainProbe(resumable_final_checkpoint="
                           "False)): it cannot resume training")
    if state["optimizer"] != optimization.kind:
        raise RuntimeError(f"checkpoint {folder} holds {state['optimizer']} optimizer state; this run optimizes "
                           f"with {optimization.kind} (resume a Ray run with ray_jobs.train --resume, a local "
                           "one with uue train --resume)")
    if optimization.kind == "deepspeed":
        load_path, _ = model.load_checkpoint(str(folder / OPTIMIZER_FOLDER / "deepspeed"), tag=f"step_{step}",
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint step_{step} under {folder / OPTIMIZER_FOLDER}")
    else:
        module = model_of(model)
        device = next(module.parameters()).device
        loaded = UUEModel.from_pretrained(folder / MODEL_FOLDER, map_location=device)
        module.load_state_dict(loaded.state_dict())
        optimization.load_state_dict(torch.load(folder / OPTIMIZER_FOLDER / "torch.pt", map_location="cpu",
                                                weights_only=False))
    rank_file = folder / "ranks" / f"rank_{rank}.pt"
    if rank_file.is_file():  # a different world size resumes with fresh RNG streams
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(rank_state["rng"])
        samplers.load_state_dict(rank_state)
    return step


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / "checkpoints"
    found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
    return [p for p in found if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoint_folders(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    for old in checkpoint_folders(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
