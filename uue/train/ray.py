"""Ray Train + DeepSpeed: the same loop as one process, on the user shards Ray Data streams to each worker.

The driver (`run_training`) only opens the preprocessed folder (preprocessing a raw one first, with Ray
Data), checks its fingerprint, and hands Ray Data a lazy `read_parquet` of the users shards; it never holds
the data or a per-step plan, so its memory does not grow with epochs, positives or users' histories.
`TorchTrainer` starts one worker per GPU (or CPU process); each worker (`train_fn`) wraps the training objective
(the model, its samplers and losses: uue.train.objective) in a DeepSpeed engine (ZeRO 0-3) and runs
`uue.train.loop.Loop` over `get_dataset_shard("train")`.

Determinism makes resuming exact: with `preserve_order` the equal split gives worker r the same users in
the same order on every epoch and attempt (verified in tests/test_ray_train.py), the stream's shuffle is
seeded by (shuffle_seed, epoch, rank) and positives by (seed, epoch, user), so step N's data follows from N.
A restarted worker reads past the batches before its checkpoint without collating them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from uue.config import REPO_ROOT, ExperimentConfig
from uue.data.featurize import Featurizer
from uue.data.readers import UUEDataset, load_dataset, write_dataset
from uue.data.shards import Shards, is_preprocessed
from uue.model.uue_model import UUEModel
from uue.train.checkpoint import MODEL_FOLDER, STATE_FILE, restore_checkpoint, write_checkpoint, zero_stage
from uue.train.data import build_inputs, open_shards, preprocessed_target
from uue.train.loop import Loop, TrainProbe, peak_flops_for
from uue.train.objective import TrainingObjective
from uue.train.pretrained_path import fit_configured_path, require_raw_data
from uue.train.step import DeepSpeedOptimization, model_of, param_groups, warmup_cosine
from uue.train.stream import UserStream, plan_steps
from uue.train.tracking import mlflow_uri, open_trackers

DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"
USER_COLUMNS = ["user_id", "chunk_tokens", "user_metadata", "positives", "label_statements", "label_values"]
READ_BATCH_ROWS = 64

logger = logging.getLogger(__name__)


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
    optim = config.model.optim
    ds["train_micro_batch_size_per_gpu"] = optim.batch_size
    ds["gradient_accumulation_steps"] = 1  # accumulation would not add in-batch negatives (DESIGN.md 5)
    ds["train_batch_size"] = optim.batch_size * world_size
    ds["gradient_clipping"] = optim.max_grad_norm or 0.0
    ds.setdefault("zero_optimization", {})["stage"] = dist.zero_stage
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params["lr"] = optim.learning_rate  # default only: every param group sets its own lr
    params["weight_decay"] = optim.weight_decay
    params.setdefault("torch_adam", True)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(dist.use_gpu)}
    ds.pop("fp16", None)
    return ds


def _dump_gathered_weights(engine: Any, path: Path, rank: int) -> None:
    import deepspeed

    module = model_of(engine)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage(engine) == 3):
        weights = {name: p.data.detach().float().cpu().clone() for name, p in module.named_parameters()}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, path)


def skip_cpu_shared_memory_build(device: torch.device) -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce kernel at `deepspeed.initialize`.

    That kernel serves only DeepSpeed inference's `inference_all_reduce`, which training never calls, yet its build
    needs a C++ toolchain, costs every fresh machine a compile, and a build killed midway leaves a lock file
    (TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock) that every later run waits on forever. Marked incompatible,
    DeepSpeed uses the process group's (gloo) collectives, as it does wherever the kernel cannot be built.
    """
    if device.type != "cpu":
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _for_workers(config: ExperimentConfig) -> dict[str, Any]:
    """The config the workers get: an MLflow URI found in the driver's environment goes with it (a cluster's
    workers do not inherit the driver's environment variables)."""
    data = config.model_dump()
    uri, _ = mlflow_uri(config)
    data["training"]["mlflow_tracking_uri"] = uri
    return data


# ---------------------------------------------------------------------------------- the worker
def train_fn(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: DeepSpeed engine, resume, the loop over its shard, checkpoints."""
    import deepspeed
    import ray.train
    import ray.train.torch

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    probe = TrainProbe(**(loop_config.get("probe") or {}))
    total_steps, steps_per_epoch = loop_config["total_steps"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ["UUE_NODE_ID"] = ray.get_runtime_context().get_node_id()
    seed = config.training.seed

    model = UUEModel.from_config(config.model, seed=seed).to(device)  # identical weights on every rank
    torch.manual_seed(seed + rank)  # dropout draws differ per rank, like different examples
    featurizer = Featurizer(config.model, model.user_tokenizer, model.item_tokenizer)
    shards = Shards(loop_config["shards_uri"], loop_config["manifest"])
    inputs = build_inputs(config, shards, model, featurizer, device, seed + rank)
    objective = TrainingObjective(model, config.model, inputs.samplers)
    schedule = warmup_cosine(total_steps, config.model.optim.warmup_ratio)
    skip_cpu_shared_memory_build(device)
    engine, *_ = deepspeed.initialize(  # the objective: every use of the weights inside one engine forward
        model=objective, model_parameters=param_groups(model, config.model), config=loop_config["deepspeed"],
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    optimization = DeepSpeedOptimization(engine)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_step = restore_checkpoint(Path(folder), model=engine, optimization=optimization,
                                            samplers=inputs.samplers, rank=rank)

    def report(step: int, epoch: int, metrics: dict[str, Any], resumable: bool = True) -> None:
        with tempfile.TemporaryDirectory(prefix="uue-checkpoint-") as tmp:
            write_checkpoint(Path(tmp), model=engine, optimization=optimization, samplers=inputs.samplers,
                             step=step, epoch=epoch, total_steps=total_steps, rank=rank, world_size=world,
                             resumable=resumable)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step:06d}")

    def fail_probe(step: int, metrics: dict[str, Any]) -> None:
        if probe.fail_at_step == step and probe.fail_rank == rank and probe.fail_marker \
                and not Path(probe.fail_marker).exists():
            # Ray Train registers a checkpoint once its controller has collected the report from every
            # worker; wait for that, so the test knows which checkpoint must resume.
            ray.train.get_all_reported_checkpoints()
            Path(probe.fail_marker).write_text(f"rank {rank} (pid {os.getpid()}) exited after step {step}\n")
            os._exit(1)  # an abrupt death: no cleanup, no report, like a lost node

    shard = ray.train.get_dataset_shard("train")

    def epoch_rows(epoch: int):
        # One pass over this worker's split of the users (Ray Data streams it; a new call is a new epoch).
        for table in shard.iter_batches(batch_size=READ_BATCH_ROWS, batch_format="pyarrow"):
            yield table.to_pylist()

    stream = UserStream(epoch_rows, config.model.optim.batch_size, steps_per_epoch, config.data.shuffle_buffer_users,
                        config.data.shuffle_seed, rank)
    loop = Loop(objective=engine, optimization=optimization, collate=inputs.collate,
                stream=stream, device=device, total_steps=total_steps,
                log_path=Path(config.training.output_dir) / "metrics.jsonl",
                log_every=config.training.log_every_steps, checkpoint_every=config.training.checkpoint_every_steps,
                save_checkpoint=report, rank=rank, world_size=world, probe=probe, after_step=fail_probe,
                checkpoint_last_step=False, peak_flops=peak_flops_for(config.training.peak_tflops, device),
                profile_steps=config.training.profile_steps, open_trackers=lambda: open_trackers(config, rank))
    history = loop.run(start_step)
    step = history[-1]["step"] if history else start_step
    if step < total_steps:
        raise RuntimeError(f"rank {rank}: stopped after {step} of {total_steps} steps")
    if probe.weights_dump_dir:
        _dump_gathered_weights(engine, Path(probe.weights_dump_dir) / "gathered_weights.pt", rank)
    # The last checkpoint is the result: the model folder in the single-process format, plus resumable state.
    report(step, loop.epoch, history[-1] if history else {"step": step},
           resumable=probe.resumable_final_checkpoint)


# ---------------------------------------------------------------------------------- the driver
@dataclass
class RayTrainResult:
    """What `run_training` returns: the final metrics, checkpoint and exported model folder."""

    steps: int
    metrics: dict[str, Any]
    checkpoint_path: str
    model_dir: Path
    run_dir: str
    steps_per_epoch: int = 0
    shards_uri: str = ""


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


def prepare_shards(config: ExperimentConfig, featurizer: Featurizer, dataset: UUEDataset | None = None) -> Shards:
    """data.path as checked shards: a preprocessed folder as it is, a raw folder (or in-memory dataset)
    preprocessed with Ray Data first (uue.data.preprocess) into data.preprocessed_dir."""
    path = config.data.path
    if dataset is None and is_preprocessed(path):
        return open_shards(config, featurizer)
    if "://" not in path:  # Ray Data's read tasks run in worker processes, not in this directory
        path = str(Path(path).resolve())
    from uue.data.preprocess import preprocess

    target = preprocessed_target(config)
    if "://" not in target:
        target = str(Path(target).resolve())
    if dataset is not None:  # an in-memory dataset is written as a contract folder first
        path = str(write_dataset(Path(target).parent / "raw", dataset))
    report = preprocess(path, target, config, overwrite=True)
    logger.info(report.summary())
    return open_shards(config, featurizer, target)


def training_dataset(shards: Shards, read_cpus: float = 1.0):
    """The lazy Ray Dataset of the training users: read_parquet of the users shards, users without a positive
    filtered out; nothing is read until the workers iterate their splits."""
    import ray.data
    from ray.data.expressions import col

    fs, _ = shards.filesystem
    # Every operator asks for read_cpus: one left at the default 1 CPU would not fuse with the read and could
    # wait forever for a CPU the workers hold (a node with 1 CPU and a 0.5-CPU worker).
    return (ray.data.read_parquet(shards.files("users"), filesystem=fs, num_cpus=read_cpus)
            .select_columns(USER_COLUMNS + ["num_positives"], num_cpus=read_cpus)
            .filter(expr=col("num_positives") > 0, num_cpus=read_cpus)
            .select_columns(USER_COLUMNS, num_cpus=read_cpus))


def run_training(config: ExperimentConfig, probe: TrainProbe | None = None, resume: bool = False,
                 dataset: UUEDataset | None = None) -> RayTrainResult:
    """Train with Ray Train + DeepSpeed on the connected Ray cluster; export output_dir/model.

    `resume=True` continues the newest run under the storage path from its last checkpoint.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from uue.data.tokenizers import load_tokenizer

    dist = config.distributed
    caching = config.model.caching
    if dist.zero_stage == 3 and (caching.cache_chunk_vectors or config.model.hidden_cache_layers("user")):
        option = "caching.cache_chunk_vectors" if caching.cache_chunk_vectors else "caching.cache_hidden_states"
        raise ValueError(f"model.{option} runs the frozen user backbone (its lower blocks) on each user's chunks "
                         "outside the engine's forward, which ZeRO-3's partitioned parameters do not allow: use "
                         "zero_stage <= 2")
    output_dir = Path(config.training.output_dir).resolve()
    config = config.model_copy(update={"training": config.training.model_copy(
        update={"output_dir": str(output_dir)})})
    towers, optim = config.model.towers, config.model.optim
    featurizer = Featurizer(config.model, load_tokenizer(towers.user_model_name),
                            load_tokenizer(towers.item_model_name))
    raw = dataset  # what the pretrained path is fitted on, read only when the config has one
    if raw is None and config.model.pretrained_path.pretrained_path_weight > 0 and not is_preprocessed(
            config.data.path):
        raw = load_dataset(config.data.path)
    require_raw_data(config, raw)
    shards = prepare_shards(config, featurizer, dataset)
    steps_per_epoch, total_steps = plan_steps(shards.train_users, dist.num_workers, optim.batch_size,
                                              optim.num_epochs, config.training.max_steps, shards.uri)
    resources = {"CPU": dist.cpus_per_worker}
    if dist.use_gpu:
        resources["GPU"] = dist.gpus_per_worker
    storage = storage_path_for(config)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={
            "experiment": _for_workers(config), "deepspeed": deepspeed_config(config, dist.num_workers),
            "shards_uri": shards.uri, "manifest": shards.manifest,
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "probe": asdict(probe) if probe else None,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=dist.placement_strategy),
        datasets={"train": training_dataset(shards, dist.featurize_cpus)},
        # preserve_order makes each worker's split the same users in the same order on every epoch and attempt.
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
    fit_configured_path(config, model_dir, raw)
    return RayTrainResult(steps=int(steps), metrics=dict(result.metrics or {}), checkpoint_path=result.checkpoint.path,
                          model_dir=model_dir, run_dir=result.path, steps_per_epoch=steps_per_epoch,
                          shards_uri=shards.uri)


def tokens_per_second(history: list[dict[str, Any]], skip: int = 0) -> float:
    """Training throughput over `history` (metrics.jsonl rows), after `skip` warm-up steps."""
    rows = history[skip:]
    seconds = sum(r["step_seconds"] for r in rows)
    return sum(r["tokens"] for r in rows) / seconds if seconds > 0 else math.nan
