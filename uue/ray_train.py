"""Distributed training on Ray: Ray Data feeds, Ray Train runs, DeepSpeed optimises, checkpoints resume.

The driver (`run_training`) reads the data contract, lays out the whole run as a *plan* of rows (one row
per training pair per step, epoch after epoch, shuffled with the same seeds as the single-process path),
and turns it into a Ray Dataset whose `map_batches` featurizes (tokenizes) the rows as they stream.
`TorchTrainer` starts one worker per GPU (or CPU process); each worker (`train_fn`) wraps the UUE model
in a DeepSpeed engine (ZeRO 0-3 from the config) and runs `uue.training.train_step` -- the very function
of the single-process path -- on the batches of its shard; the loss gathers negatives across workers.

Determinism is what makes resuming exact: the plan has one block per worker batch and is consumed with
`preserve_order`, so worker r's k-th batch is always rows [(k*W + r)*b, (k*W + r + 1)*b) of the plan
(each row also carries its step, which the worker checks). A restarted worker skips the batches its
checkpoint already trained on, so no step is repeated or lost.

Checkpoints (`ray.train.report`) hold the DeepSpeed state of every rank (`deepspeed/`), each rank's RNG
and sampler state (negatives, label loss), the step, and the full model in the single-process format (`model/`,
gathered from the shards under ZeRO-3), so any checkpoint is also a loadable model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uue.config import REPO_ROOT, ExperimentConfig, ModelConfig
from uue.data.featurize import Featurizer, trim_batch
from uue.data.readers import UUEDataset, load_dataset
from uue.data.schema import parse_statement, parse_user, statement_to_record, user_to_record
from uue.loss import InfoNCELoss
from uue.model.uue_model import UUEModel
from uue.training import (
    Samplers,
    _rng_state,
    _set_rng_state,
    build_samplers,
    param_groups,
    refresh_negatives,
    train_step,
    unwrap,
    wants_samplers,
    warmup_cosine,
)

if TYPE_CHECKING:
    import ray.data

DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"
PLAN_COLUMNS = ("step", "epoch")  # travel with each batch for checks and logs; not model inputs
MODEL_FOLDER = "model"
DEEPSPEED_FOLDER = "deepspeed"
STATE_FILE = "training_state.json"
BATCH_LOG_FOLDER = "batch_log"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(config: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: the base JSON for the ZeRO stage, then what the experiment config decides."""
    dist = config.distributed
    default = DEEPSPEED_CONFIG_DIR / f"zero{dist.zero_stage}.json"
    path = Path(dist.deepspeed_config) if dist.deepspeed_config else default
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (distributed.deepspeed_config / zero_stage)")
    ds = json.loads(path.read_text())
    model = config.model
    ds["train_micro_batch_size_per_gpu"] = model.batch_size
    ds["gradient_accumulation_steps"] = 1  # accumulation would not add in-batch negatives (DESIGN.md 5)
    ds["train_batch_size"] = model.batch_size * world_size
    ds["gradient_clipping"] = model.max_grad_norm or 0.0
    ds.setdefault("zero_optimization", {})["stage"] = dist.zero_stage
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params["lr"] = model.learning_rate  # default only: every param group sets its own lr
    params["weight_decay"] = model.weight_decay
    params.setdefault("torch_adam", True)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(dist.use_gpu)}
    ds.pop("fp16", None)
    return ds


class DeepSpeedOptimization:
    """`uue.training.Optimization` around a DeepSpeed engine: backward, clip and step are the engine's."""

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


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the model inside `engine`, whatever the ZeRO stage (a collective: all ranks call).

    Trained parameters come from the optimizer's fp32 master copy (`safe_get_full_fp32_param`), so a bf16
    run exports fp32 like the single-process path; frozen ZeRO-3 parameters are gathered from their shards.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = unwrap(engine)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
                full = param.data.detach().clone()
        state[name] = full.detach().float().cpu().clone()
    return state


# ---------------------------------------------------------------------------------- the data plan
@dataclass
class TrainingPlan:
    """Every (user, statement) pair each step trains on, in order: the run's data, laid out in advance.

    Rows of step s are global batch s (`world_size * batch_size` rows); within it, worker r takes the r-th
    slice of `batch_size` rows. Epoch e shuffles the label-1 pairs of the training split with
    `shuffle_seed + e` (as `PairBatches` does) and drops the remainder that does not fill a global batch.
    """

    rows: list[dict[str, Any]]
    total_steps: int
    steps_per_epoch: int
    world_size: int
    batch_size: int
    user_ids: list[str]
    statement_ids: list[str]
    statements: list[dict[str, Any]]
    positives: dict[int, list[int]] = field(default_factory=dict)
    labels: dict[int, list[list[int]]] = field(default_factory=dict)
    """(statement index, 0/1) of every training-split label per user: labeled negatives and the label loss."""

    @classmethod
    def build(cls, dataset: UUEDataset, config: ExperimentConfig, world_size: int | None = None) -> TrainingPlan:
        world_size = world_size or config.distributed.num_workers
        batch = config.model.batch_size
        user_ids = sorted(dataset.users)
        statement_ids = sorted(dataset.statements)
        user_pos = {u: i for i, u in enumerate(user_ids)}
        statement_pos = {s: i for i, s in enumerate(statement_ids)}
        pairs = np.array([(user_pos[u], statement_pos[s]) for u, s in dataset.positive_pairs(config.data.train_split)],
                         dtype=np.int64).reshape(-1, 2)
        global_batch = batch * world_size
        steps_per_epoch = len(pairs) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(pairs)} positive pairs in split {config.data.train_split!r} of {dataset.source}: fewer than "
                f"one global batch of {global_batch} ({world_size} workers x model.batch_size {batch})"
            )
        total = config.training.max_steps or config.model.num_epochs * steps_per_epoch
        user_records = {i: json.dumps(user_to_record(dataset.users[u])) for i, u in enumerate(user_ids)}
        statement_records = [statement_to_record(dataset.statements[s]) for s in statement_ids]
        statement_json = [json.dumps(r) for r in statement_records]
        rows: list[dict[str, Any]] = []
        for step in range(total):
            epoch, index = divmod(step, steps_per_epoch)
            order = np.random.default_rng(config.data.shuffle_seed + epoch).permutation(len(pairs))
            for user, statement in pairs[order[index * global_batch : (index + 1) * global_batch]].tolist():
                rows.append({"step": step + 1, "epoch": epoch, "user_index": user, "statement_index": statement,
                             "user": user_records[user], "statement": statement_json[statement]})
        positives: dict[int, list[int]] = {}
        for user, statement in pairs.tolist():
            positives.setdefault(user, []).append(statement)
        labels: dict[int, list[list[int]]] = {}
        for lab in dataset.labels_in(config.data.train_split):
            labels.setdefault(user_pos[lab.user_id], []).append([statement_pos[lab.statement_id], int(lab.label)])
        return cls(rows, total, steps_per_epoch, world_size, batch, user_ids, statement_ids, statement_records,
                   positives, labels)

    def to_ray_dataset(self, config: ExperimentConfig) -> ray.data.Dataset:
        """A Ray Dataset of the plan, featurized in `map_batches` tasks; one block per worker batch."""
        import ray.data

        blocks = len(self.rows) // self.batch_size
        return ray.data.from_items(self.rows, override_num_blocks=blocks).map_batches(
            featurize_pairs,
            fn_kwargs={"model_config_json": config.model.model_dump_json()},
            batch_size=self.batch_size,
            batch_format="numpy",
            num_cpus=config.distributed.featurize_cpus,
        )


@lru_cache(maxsize=4)
def _featurizer(model_config_json: str) -> Featurizer:
    """One featurizer (two tokenizers) per process and model config: tasks reuse their worker's."""
    from uue.model.backbone import load_tokenizer

    config = ModelConfig.model_validate_json(model_config_json)
    return Featurizer(config, load_tokenizer(config.user_model_name), load_tokenizer(config.item_model_name))


def featurize_pairs(batch: dict[str, np.ndarray], model_config_json: str) -> dict[str, np.ndarray]:
    """Plan rows (user and statement records as JSON) -> fixed-shape model features, in row order."""
    featurizer = _featurizer(model_config_json)
    users = [parse_user(json.loads(raw), "<training plan>", int(step)) for raw, step in
             zip(batch["user"], batch["step"], strict=True)]
    statements = [parse_statement(json.loads(raw), "<training plan>", int(step)) for raw, step in
                  zip(batch["statement"], batch["step"], strict=True)]
    per_user = [featurizer.user_features(u) for u in users]
    out = {key: np.stack([f[key] for f in per_user]) for key in per_user[0]}
    out.update(featurizer.statement_features(statements))
    for key in ("user_index", "statement_index", *PLAN_COLUMNS):
        out[key] = np.asarray(batch[key], dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------- probes
@dataclass
class TrainProbe:
    """Diagnostics a run can be asked for (tests, audits); none changes what is trained.

    batch_log_dir:      each rank appends (step, epoch, user/statement indices, loss, node) per step to
                        rank_R.jsonl there: the audit trail of which data every step used.
    gradient_dump_step: at this step rank 0 saves the full averaged gradient (before clipping and the
                        update) of every parameter to gradient_dump_dir/step_S.pt.
    weights_dump_dir:   at the end rank 0 saves the engine's full weights gathered with
                        `deepspeed.zero.GatheredParameters` (independently of the export path).
    fail_at_step / fail_rank / fail_marker: chaos test -- that rank's process exits abruptly right after
                        that step, once (the marker file records that it already happened), after Ray
                        Train has registered the checkpoints reported so far.
    """

    batch_log_dir: str | None = None
    gradient_dump_step: int | None = None
    gradient_dump_dir: str | None = None
    weights_dump_dir: str | None = None
    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_marker: str | None = None


def _dump_gradients(engine: Any, path: Path, rank: int) -> None:
    """Full averaged gradients (a collective under ZeRO-1/2: every rank calls, rank 0 writes)."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in unwrap(engine).named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            grads[name] = None if grad is None else grad.detach().float().cpu().clone()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(grads, path)


def _dump_gathered_weights(engine: Any, path: Path, rank: int) -> None:
    import deepspeed

    module = unwrap(engine)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage(engine) == 3):
        weights = {name: p.data.detach().float().cpu().clone() for name, p in module.named_parameters()}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, path)


# ---------------------------------------------------------------------------------- the worker
def _build_samplers(config: ModelConfig, featurizer: Featurizer, plan: dict[str, Any], seed: int) -> Samplers:
    """This rank's samplers from the plan (the statement pool is featurized only when one is on)."""
    if not wants_samplers(config):
        return Samplers()
    pool = featurizer.statement_features([parse_statement(r, "<statements>", i + 1)
                                          for i, r in enumerate(plan["statements"])])
    positives = {int(u): set(s) for u, s in plan["positives"].items()}
    labels = {int(u): [(s, value) for s, value in pairs] for u, pairs in plan.get("labels", {}).items()}
    return build_samplers(config, pool, positives, labels, seed)


def _mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def _batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, tokens the encoders process after trimming shared padding) in one local batch."""
    trimmed = trim_batch(batch)
    real = int(batch["user_attention_mask"].sum()) + int(batch["item_attention_mask"].sum())
    chunks = int(trimmed["chunk_mask"].sum())
    processed = chunks * trimmed["user_attention_mask"].shape[-1] + trimmed["item_input_ids"].numel()
    return real, processed


def _save_checkpoint(engine: Any, samplers: Samplers, step: int, epoch: int, rank: int,
                     metrics: dict[str, Any], total_steps: int, resumable: bool = True) -> None:
    """Every rank writes its DeepSpeed shard and RNG state, rank 0 the model folder; then all report."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="uue-checkpoint-") as tmp:
        folder = Path(tmp)
        if resumable:
            engine.save_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=f"step_{step}")
        weights = full_state_dict(engine)
        (folder / "ranks").mkdir()
        torch.save({"rng": _rng_state(), **samplers.state_dict()},
                   folder / "ranks" / f"rank_{rank}.pt")
        if rank == 0:
            unwrap(engine).save_pretrained(folder / MODEL_FOLDER, state_dict=weights)
            (folder / STATE_FILE).write_text(json.dumps({
                "step": step, "epoch": epoch, "total_steps": total_steps, "zero_stage": zero_stage(engine),
                "resumable": resumable,
                "world_size": engine.world_size if hasattr(engine, "world_size") else 1,
            }))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=f"step_{step:06d}")


def _restore(engine: Any, samplers: Samplers, rank: int) -> int:
    """Load the last reported checkpoint, if any, into the engine; returns the step it was taken at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        folder = Path(path)
        state = json.loads((folder / STATE_FILE).read_text())
        step = int(state["step"])
        if not state.get("resumable", True):
            raise RuntimeError(f"checkpoint {checkpoint.path} holds the model only "
                               "(distributed.resumable_final_checkpoint=false): it cannot resume training")
        load_path, _ = engine.load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=f"step_{step}",
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint step_{step} under {folder / DEEPSPEED_FOLDER}")
        rank_file = folder / "ranks" / f"rank_{rank}.pt"
        if rank_file.is_file():  # a different world size resumes with fresh RNG streams
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
            _set_rng_state(rank_state["rng"])
            samplers.load_state_dict(rank_state)
    return step


def train_fn(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: DeepSpeed engine, resume, `train_step` over its shard, checkpoints."""
    import deepspeed
    import ray.train
    import ray.train.torch

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    plan = loop_config["plan"]
    probe = TrainProbe(**(loop_config.get("probe") or {}))
    total_steps: int = plan["total_steps"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = config.training.seed

    model = UUEModel.from_config(config.model, seed=seed)  # identical weights on every rank
    torch.manual_seed(seed + rank)  # dropout draws differ per rank, like different examples
    featurizer = Featurizer(config.model, model.user_tokenizer, model.item_tokenizer)
    samplers = _build_samplers(config.model, featurizer, plan, seed + rank)
    schedule = warmup_cosine(total_steps, config.model.warmup_ratio)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, config.model), config=loop_config["deepspeed"],
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    start_step = _restore(engine, samplers, rank)
    optimization = DeepSpeedOptimization(engine)
    loss_fn = InfoNCELoss()
    log_path = Path(config.training.output_dir) / "metrics.jsonl"
    if rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    batch_log = None
    if probe.batch_log_dir:
        Path(probe.batch_log_dir).mkdir(parents=True, exist_ok=True)
        batch_log = (Path(probe.batch_log_dir) / f"rank_{rank}.jsonl").open("a")
    node_id = ray.get_runtime_context().get_node_id()

    shard = ray.train.get_dataset_shard("train")
    step, epoch, metrics = 0, 0, {}
    every = config.training.checkpoint_every_steps
    waited = time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=plan["batch_size"], drop_last=True):
        planned = batch.pop("step")
        epoch = int(batch.pop("epoch")[0])
        if not bool((planned == step + 1).all()):
            raise RuntimeError(
                f"rank {rank}: batch {step + 1} of its shard holds rows of steps {sorted(set(planned.tolist()))}; "
                "the shard is not in plan order (the dataset must keep one block per worker batch)"
            )
        if step < start_step:  # trained before the checkpoint we resumed from
            step += 1
            waited = time.perf_counter()
            continue
        data_seconds = time.perf_counter() - waited
        refresh_negatives(engine, samplers.negative, step, device)
        if probe.gradient_dump_step == step + 1 and probe.gradient_dump_dir:
            dump_to = Path(probe.gradient_dump_dir) / f"step_{step + 1}.pt"
            optimization.before_step = lambda eng, dump_to=dump_to: _dump_gradients(eng, dump_to, rank)
        else:
            optimization.before_step = None
        real_tokens, processed_tokens = _batch_tokens(batch)
        started = time.perf_counter()
        metrics = train_step(engine, batch, loss_fn, optimization, samplers.negative, samplers.label)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - started
        step += 1
        local_loss = metrics["loss"]
        metrics.update(step=step, epoch=epoch, loss=_mean_across_ranks(local_loss), local_loss=local_loss,
                       step_seconds=step_seconds, data_seconds=data_seconds, workers=world,
                       tokens=round(_mean_across_ranks(real_tokens) * world),
                       processed_tokens=round(_mean_across_ranks(processed_tokens) * world))
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if batch_log is not None:
            batch_log.write(json.dumps({
                "pid": os.getpid(), "resumed_from": start_step, "rank": rank, "node": node_id, "step": step,
                "epoch": epoch, "user_index": batch["user_index"].tolist(),
                "statement_index": batch["statement_index"].tolist(), "local_loss": local_loss,
            }) + "\n")
            batch_log.flush()
        if rank == 0 and (step % config.training.log_every_steps == 0 or step == total_steps):
            with log_path.open("a") as log:
                log.write(json.dumps(metrics) + "\n")
        if probe.fail_at_step == step and probe.fail_rank == rank and probe.fail_marker \
                and not Path(probe.fail_marker).exists():
            # Ray Train registers a checkpoint once its controller has collected the report from every
            # worker (it polls every ~2 s); wait for that, so the test knows which checkpoint must resume.
            ray.train.get_all_reported_checkpoints()
            Path(probe.fail_marker).write_text(f"rank {rank} (pid {os.getpid()}) exited after step {step}\n")
            os._exit(1)  # an abrupt death: no cleanup, no report, like a lost node
        if step >= total_steps:
            break
        if every and step % every == 0:
            _save_checkpoint(engine, samplers, step, epoch, rank, metrics, total_steps)
        waited = time.perf_counter()
    if step < total_steps:
        raise RuntimeError(f"rank {rank}: the shard ran out after {step} of {total_steps} steps")
    if probe.weights_dump_dir:
        _dump_gathered_weights(engine, Path(probe.weights_dump_dir) / "gathered_weights.pt", rank)
    # The last checkpoint is the result: the model folder in the single-process format, plus resumable state.
    _save_checkpoint(engine, samplers, step, epoch, rank, metrics, total_steps,
                     resumable=config.distributed.resumable_final_checkpoint)
    if batch_log is not None:
        batch_log.close()


# ---------------------------------------------------------------------------------- the driver
@dataclass
class RayTrainResult:
    """What `run_training` returns: the final metrics, checkpoint and exported model folder."""

    steps: int
    metrics: dict[str, Any]
    checkpoint_path: str
    model_dir: Path
    run_dir: str
    plan: TrainingPlan | None = None


def storage_path_for(config: ExperimentConfig) -> str:
    storage = config.distributed.storage_path
    if storage and "://" in storage:
        return storage
    return str(Path(storage or Path(config.training.output_dir) / "ray_train").resolve())


def _run_name(storage: str, resume: bool) -> str:
    """A fresh run name, or the newest run under `storage` when resuming (Ray Train restores it by name)."""
    if resume and "://" not in storage and Path(storage).is_dir():
        runs = sorted((p for p in Path(storage).iterdir() if p.is_dir() and p.name.startswith("uue-train-")),
                      key=lambda p: p.name)
        if runs:
            return runs[-1].name
    return f"uue-train-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def run_training(config: ExperimentConfig, probe: TrainProbe | None = None, resume: bool = False,
                 dataset: UUEDataset | None = None) -> RayTrainResult:
    """Train with Ray Train + DeepSpeed on the connected Ray cluster; export output_dir/model.

    `resume=True` continues the newest run under the storage path from its last checkpoint.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    dist = config.distributed
    if config.model.cache_chunk_vectors or config.model.cache_statement_vectors:
        raise ValueError("model.cache_chunk_vectors / model.cache_statement_vectors are single-process options "
                         "(uue train); the Ray workers encode on the fly: set them to false for ray_jobs.train")
    dataset = dataset if dataset is not None else load_dataset(config.data.path)
    plan = TrainingPlan.build(dataset, config)
    resources = {"CPU": dist.cpus_per_worker}
    if dist.use_gpu:
        resources["GPU"] = dist.gpus_per_worker
    storage = storage_path_for(config)
    output_dir = Path(config.training.output_dir).resolve()
    experiment = config.model_copy(update={"training": config.training.model_copy(
        update={"output_dir": str(output_dir)})})
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={
            "experiment": experiment.model_dump(),
            "deepspeed": deepspeed_config(config, dist.num_workers),
            "plan": {"total_steps": plan.total_steps, "batch_size": plan.batch_size,
                     "statements": plan.statements, "positives": plan.positives, "labels": plan.labels},
            "probe": asdict(probe) if probe else None,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=dist.placement_strategy),
        datasets={"train": plan.to_ray_dataset(config)},
        # preserve_order makes each worker's shard the same rows in the same order on every attempt.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False),
        run_config=ray.train.RunConfig(
            name=_run_name(storage, resume), storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.training.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {result.path} finished without a checkpoint")
    model_dir = output_dir / MODEL_FOLDER
    with result.checkpoint.as_directory() as folder:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(folder) / MODEL_FOLDER, model_dir)
        steps = json.loads((Path(folder) / STATE_FILE).read_text())["step"]
    metrics = dict(result.metrics or {})
    return RayTrainResult(steps=int(steps), metrics=metrics, checkpoint_path=result.checkpoint.path,
                          model_dir=model_dir, run_dir=result.path, plan=plan)


def tokens_per_second(history: list[dict[str, Any]], skip: int = 0) -> float:
    """Training throughput over `history` (metrics.jsonl rows), after `skip` warm-up steps."""
    rows = history[skip:]
    seconds = sum(r["step_seconds"] for r in rows)
    return sum(r["tokens"] for r in rows) / seconds if seconds > 0 else math.nan
