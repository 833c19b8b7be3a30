"""Single-process training: `uue train`, the demo, and the reference the Ray path matches step for step.

It runs the loop of uue.train.loop over the same user-row stream a Ray worker gets (the shard files read in
order, instead of a Ray Data shard), with a torch optimizer, and checkpoints in the one layout of
uue.train.checkpoint under output_dir/checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uue.config import ExperimentConfig, ModelConfig
from uue.data.featurize import Featurizer
from uue.data.readers import UUEDataset
from uue.model.uue_model import UUEModel
from uue.train.checkpoint import latest_checkpoint, prune_checkpoints, restore_checkpoint, write_checkpoint
from uue.train.data import build_inputs, local_shards
from uue.train.loop import Loop, TrainProbe, peak_flops_for
from uue.train.objective import TrainingObjective
from uue.train.pretrained_path import fit_configured_path, require_raw_data
from uue.train.step import TorchOptimization
from uue.train.stream import UserStream, plan_steps
from uue.train.tracking import open_trackers


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None
    last_checkpoint: Path | None = None


class UUETrainer:
    """`fit()` trains for `training.max_steps` (or `model.optim.num_epochs` epochs over the training users), writes
    checkpoints every `training.checkpoint_every_steps`, and exports the final model to `output_dir/model`.
    `fit(resume_from=...)` continues a run exactly where it stopped.

    `config.data.path` is a preprocessed folder, or a data-contract folder preprocessed here first (so is an
    in-memory `dataset`); `self.dataset` is the raw dataset when there is one (calibration, the demo).
    """

    def __init__(self, config: ExperimentConfig | ModelConfig, dataset: UUEDataset | None = None,
                 model: UUEModel | None = None, device: str | torch.device | None = None,
                 probe: TrainProbe | None = None):
        self.config = config if isinstance(config, ExperimentConfig) else ExperimentConfig(model=config)
        cfg = self.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        seed = cfg.training.seed
        torch.manual_seed(seed)
        self.model = (model or UUEModel.from_config(cfg.model, seed=seed)).to(self.device)
        self.featurizer = Featurizer(cfg.model, self.model.user_tokenizer, self.model.item_tokenizer)
        self.shards, self.dataset = local_shards(cfg, self.featurizer, dataset)
        require_raw_data(cfg, self.dataset)
        self.inputs = build_inputs(cfg, self.shards, self.model, self.featurizer, self.device, seed,
                                   share_tables=True)
        self.samplers = self.inputs.samplers
        self.objective = TrainingObjective(self.model, cfg.model, self.samplers)
        optim = cfg.model.optim
        self.steps_per_epoch, self.total_steps = plan_steps(
            self.shards.train_users, 1, optim.batch_size, optim.num_epochs, cfg.training.max_steps, self.shards.uri)
        self.optimization = TorchOptimization(self.model, cfg.model, self.total_steps)
        self.output_dir = Path(cfg.training.output_dir)
        stream = UserStream(lambda epoch: self.shards.iter_train_users(), optim.batch_size,
                            self.steps_per_epoch, cfg.data.shuffle_buffer_users, cfg.data.shuffle_seed)
        self.loop = Loop(
            objective=self.objective, optimization=self.optimization, collate=self.inputs.collate,
            stream=stream, device=self.device, total_steps=self.total_steps,
            log_path=self.output_dir / "metrics.jsonl", log_every=cfg.training.log_every_steps,
            checkpoint_every=cfg.training.checkpoint_every_steps, save_checkpoint=self._checkpoint,
            probe=probe or TrainProbe(), progress=cfg.training.progress_bar,
            peak_flops=peak_flops_for(cfg.training.peak_tflops, self.device),
            profile_steps=cfg.training.profile_steps, open_trackers=lambda: open_trackers(self.config))
        self.step = 0
        self.last_checkpoint: Path | None = None

    def _checkpoint(self, step: int, epoch: int, metrics: dict[str, Any] | None = None) -> Path:
        folder = self.output_dir / "checkpoints" / f"step_{step:06d}"
        write_checkpoint(folder, model=self.model, optimization=self.optimization, samplers=self.samplers,
                         step=step, epoch=epoch, total_steps=self.total_steps)
        prune_checkpoints(self.output_dir, self.config.training.keep_checkpoints)
        self.last_checkpoint = folder
        return folder

    def save_checkpoint(self) -> Path:
        return self._checkpoint(self.step, self.loop.epoch)

    def load_checkpoint(self, folder: str | Path) -> None:
        self.step = restore_checkpoint(Path(folder), model=self.model, optimization=self.optimization,
                                       samplers=self.samplers)

    def fit(self, resume_from: str | Path | None = None, max_steps: int | None = None) -> TrainResult:
        """Train until `max_steps` (default: the configured total); `resume_from="latest"` finds the last checkpoint."""
        if resume_from == "latest":
            resume_from = latest_checkpoint(self.output_dir)
        if resume_from:
            self.load_checkpoint(resume_from)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = self.loop.run(self.step, max_steps)
        if history:
            self.step = history[-1]["step"]
        result = TrainResult(steps=self.step, history=history, last_checkpoint=self.last_checkpoint)
        if self.step >= self.total_steps:
            result.model_dir = self.model.save_pretrained(self.output_dir / "model")
            fit_configured_path(self.config, result.model_dir, self.dataset)
        return result

    def train(self, max_steps: int | None = None) -> TrainResult:
        """Seed-API name for `fit`."""
        return self.fit(max_steps=max_steps)
