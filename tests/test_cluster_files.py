"""Cluster files against what they drive: the launcher YAML against Ray's own schema, the KubeRay RayJob's
entrypoint against the job's real argument parser and the config schema, resources against the training
config, image and Ray versions against the pin, and the job runtime env against Ray's own packaging."""

from __future__ import annotations

import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from uue.config import load_config
from uue.train.ray import deepspeed_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER = REPO_ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB = CLUSTER / "rayjob-train-qwen3.yaml"
RUNTIME_ENV = REPO_ROOT / "ray_jobs" / "runtime_env.yaml"


def _pinned_ray_version() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins ray with =="
    return match.group(1)


def _entrypoint(command: str) -> tuple[str, list[str]]:
    """`python -m ray_jobs.X args...` -> (module name, args); the module file must exist in the repo."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = words[2]
    path = REPO_ROOT / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"entry point {module} has no file {path}"
    return module, words[3:]


def _load_job_config(module: str, args: list[str]):
    """Parse the args with the job's own parser, then load and validate its config with the overrides."""
    import importlib

    job = importlib.import_module(module)
    parsed = job.build_parser().parse_args(args)
    config_path = REPO_ROOT / parsed.config
    assert config_path.is_file(), f"{parsed.config} does not resolve in the repository"
    return load_config(config_path, parsed.overrides)


def _quantity(value: str | int) -> float:
    """Kubernetes CPU / GPU quantities: "8", "500m"."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


# ---------------------------------------------------------------------------------- launcher YAML
def test_launcher_yaml_passes_rays_schema_and_fits_the_training_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(raw))  # Ray's launcher schema: unknown or misspelt keys fail here

    ray_version = _pinned_ray_version()
    assert f"rayproject/ray:{ray_version}-" in raw["docker"]["image"]

    config = load_config(REPO_ROOT / "configs" / "qwen3-embedding-0.6b.yaml")
    dist = config.distributed
    gpu_types = {name: t for name, t in raw["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and raw["head_node_type"] not in gpu_types
    capacity = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types.values())
    assert capacity >= dist.num_workers * dist.gpus_per_worker
    for node in gpu_types.values():  # workers on one node must find their CPUs there
        workers_per_node = node["resources"]["GPU"] // dist.gpus_per_worker
        assert node["resources"]["CPU"] >= workers_per_node * dist.cpus_per_worker
    assert raw["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())

    # The repo is synced and installed on every node; nothing heavy travels with it.
    assert raw["file_mounts"]["~/uue"] == "."
    assert any("pip install" in c and "~/uue" in c for c in raw["setup_commands"])
    assert {".venv", ".git", "runs"} <= set(raw["rsync_exclude"])
    # Token authentication on every node.
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    assert "~/.ray/auth_token" in raw["file_mounts"]


# ---------------------------------------------------------------------------------- KubeRay RayJob
def test_rayjob_runs_qwen3_zero2_bf16_and_its_resources_cover_the_workers():
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    preprocess_step, train_step = spec["entrypoint"].split(" && ")
    module, args = _entrypoint(preprocess_step)
    assert module == "ray_jobs.preprocess"
    import ray_jobs.preprocess
    import ray_jobs.train

    preprocess = ray_jobs.preprocess.build_parser().parse_args(args)
    module, args = _entrypoint(train_step)
    assert module == "ray_jobs.train"
    config = _load_job_config(module, args)
    # Training reads what the first step wrote, made with the same config (the manifest check needs it).
    assert config.data.path == preprocess.output
    assert preprocess.config == ray_jobs.train.build_parser().parse_args(args).config

    assert config.model.user_model_name == config.model.item_model_name == "qwen3-embedding-0.6b"
    dist = config.distributed
    assert dist.use_gpu and dist.zero_stage == 2
    ds = deepspeed_config(config, dist.num_workers)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # workers and tokenization stay off the head
    gpus = cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        pod_gpus, pod_cpus = _quantity(limits["nvidia.com/gpu"]), _quantity(limits["cpu"])
        workers_in_pod = pod_gpus // dist.gpus_per_worker
        # The Ray Train workers of one pod, plus a CPU for Ray Data tokenization beside them.
        assert pod_cpus >= workers_in_pod * dist.cpus_per_worker + config.distributed.featurize_cpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus += pod_gpus * group["replicas"]
        cpus += pod_cpus * group["replicas"]
    assert gpus >= dist.num_workers * dist.gpus_per_worker
    assert cpus >= dist.num_workers * dist.cpus_per_worker

    # Every pod runs the project image built on the pinned Ray, and mounts the volume the paths point into.
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    paths = [config.data.path, config.training.output_dir, dist.storage_path,
             runtime_env["env_vars"]["UUE_QWEN3_EMBEDDING_PATH"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"].endswith(f"-ray{_pinned_ray_version()}-gpu")
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in paths:
            assert any(path.startswith(m + "/") for m in mounts), (path, mounts)

    # The job's runtime env is ray_jobs/runtime_env.yaml plus the working dir inside the image.
    shared = yaml.safe_load(RUNTIME_ENV.read_text())
    assert runtime_env["excludes"] == shared["excludes"]
    assert shared["env_vars"].items() <= runtime_env["env_vars"].items()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_pinned_ray_version()}-" in dockerfile
    assert re.search(rf"WORKDIR {re.escape(runtime_env['working_dir'])}\s", dockerfile)
    for source in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, flags=re.M):
        for name in source.split():
            assert (REPO_ROOT / name).exists(), f"Dockerfile copies missing {name}"


def test_rayjob_entrypoint_with_a_misspelt_override_is_rejected():
    """The check above has teeth: the same path refuses a config key that does not exist."""
    from uue.config import ConfigError

    job = yaml.safe_load(RAYJOB.read_text())
    module, args = _entrypoint(job["spec"]["entrypoint"].split(" && ")[1] + " distributed.zero_stgae=2")
    with pytest.raises(ConfigError, match="zero_stgae"):
        _load_job_config(module, args)


# ---------------------------------------------------------------------------------- entry points in the docs
def test_every_documented_ray_job_entry_point_exists():
    texts = [(REPO_ROOT / "README.md").read_text(), LAUNCHER.read_text(), RAYJOB.read_text()]
    texts += [p.read_text() for p in (REPO_ROOT / "ray_jobs").glob("*.py")]
    modules = set(re.findall(r"python -m (ray_jobs\.[a-z_]+)\b", "\n".join(texts)))
    assert {"ray_jobs.preprocess", "ray_jobs.train", "ray_jobs.evaluate"} <= modules
    for module in modules:
        assert (REPO_ROOT / "ray_jobs" / f"{module.split('.')[1]}.py").is_file(), module


# ---------------------------------------------------------------------------------- the job runtime env
def test_runtime_env_uploads_the_code_and_leaves_out_venv_runs_and_git(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(runtime_env) <= {"excludes", "env_vars"}  # working_dir comes from --working-dir
    package = tmp_path / "pkg.zip"
    # Ray's own packaging of `--working-dir .`, with only our excludes (not .gitignore) deciding.
    create_package(str(REPO_ROOT), package, include_gitignore=False, excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    for needed in ("ray_jobs/preprocess.py", "ray_jobs/train.py", "ray_jobs/evaluate.py", "uue/data/featurize.py",
                   "uue/data/sample_data/users.jsonl", "configs/tiny.yaml", "configs/qwen3-embedding-0.6b.yaml"):
        assert needed in names, needed
    for excluded in (".venv/", ".git/", "runs/", ".gpu/"):
        assert not any(n.startswith(excluded) for n in names), excluded
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert package.stat().st_size < 50 * 2**20  # far under Ray's package limit
