"""The Serve config YAMLs and the RayService manifest resolve: import paths, typed args, the same app.

Each application is built through Ray's own builder path (`call_user_app_builder_with_args_if_necessary`,
what `serve run`/`serve deploy`/KubeRay call with the YAML's `args:` dict), not by calling `build_app` with a
ready `ServeArgs`: a builder Ray cannot type (a string annotation) gets a plain dict there and fails.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from uue.serving.settings import ServeArgs

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = [REPO / "serve" / "config.local.yaml", REPO / "serve" / "config.gpu.yaml"]


def _resolve(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A saved tiny model folder, standing in for the YAMLs' model_dir (/mnt/uue/... does not exist here)."""
    from uue.config import ModelConfig
    from uue.model import UUEModel

    folder = tmp_path_factory.mktemp("serve-config") / "model"
    UUEModel.from_config(ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16,
                                     attention_heads=4, max_chunk_length=32, max_statement_length=16,
                                     num_chunks_per_user=8)).save_pretrained(folder)
    return folder


def _build_as_ray_does(app_config: dict, model_dir: Path):
    """The application `serve run`/`serve deploy` would build from one `applications:` entry."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    args = {**app_config.get("args", {}), "model_dir": str(model_dir)}
    return call_user_app_builder_with_args_if_necessary(_resolve(app_config["import_path"]), args)


def _deployments(app) -> dict:
    """name -> Deployment of a built application (the ingress binds the two towers)."""
    ingress = app._bound_deployment
    towers = [arg._bound_deployment for arg in ingress.init_args[:2]]
    return {d.name: d for d in [ingress, *towers]}


def _check_built_app(app_config: dict, model_dir: Path) -> None:
    from ray.serve import Application

    app = _build_as_ray_does(app_config, model_dir)
    assert isinstance(app, Application)
    args = ServeArgs.model_validate({**app_config["args"], "model_dir": str(model_dir)})
    deployments = _deployments(app)
    assert set(deployments) == {"Ingress", "UserTower", "ItemTower"}
    for name, tower in (("UserTower", args.user_tower), ("ItemTower", args.item_tower)):
        deployment = deployments[name]
        assert deployment.ray_actor_options == {"num_cpus": tower.num_cpus, "num_gpus": tower.num_gpus}
        scaling = deployment._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas) == (tower.min_replicas, tower.max_replicas)
        assert deployment._deployment_config.max_ongoing_requests == tower.max_ongoing_requests
        assert tower.max_ongoing_requests >= tower.max_batch_size > 0
    # The ingress receives the validated args with absolute paths.
    assert deployments["Ingress"].init_args[2]["model_dir"] == str(model_dir.resolve())


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_builds_through_rays_builder_path(path, saved_model):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` check first
    (app_config,) = config["applications"]
    _check_built_app(app_config, saved_model)


@pytest.mark.parametrize("source", ["config.local.yaml", "defaults"])
def test_local_serving_fits_two_cpus(source):
    """`serve run serve/config.local.yaml` and `serve run serve.app:build_app model_dir=...` (the defaults) start
    on a 2-core machine: every minimum replica must be schedulable there (and every replica at max scale too,
    so autoscaling never waits for CPUs)."""
    if source == "defaults":
        args = ServeArgs(model_dir="m")
    else:
        (app_config,) = yaml.safe_load(SERVE_CONFIGS[0].read_text())["applications"]
        args = ServeArgs.model_validate(app_config["args"])
    parts = [args.user_tower, args.item_tower, args.ingress]
    assert sum(p.num_cpus * p.min_replicas for p in parts) <= 2
    assert sum(p.num_cpus * p.max_replicas for p in parts) <= 2


def test_rayservice_embeds_the_gpu_serve_config(saved_model):
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    gpu = yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())
    assert embedded["applications"] == gpu["applications"]
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == importlib.import_module("ray").__version__
    (app_config,) = embedded["applications"]
    _check_built_app(app_config, saved_model)


def test_rays_builder_path_refuses_bad_args_with_the_key(saved_model):
    with pytest.raises(ValidationError, match="user_towr"):
        _build_as_ray_does({"import_path": "serve.app:build_app", "args": {"user_towr": {}}}, saved_model)


def test_command_line_dotted_keys_set_one_field_of_a_section(saved_model):
    """`serve run serve.app:build_app model_dir=... user_store.backend=redis`: Ray passes the flat key=value
    strings; a dotted key fills a section, a misspelt one is refused with its path."""
    app = _build_as_ray_does({"import_path": "serve.app:build_app", "args": {
        "user_store.backend": "redis", "user_store.timeout_s": "2", "limits.max_top_k": "50"}}, saved_model)
    args = ServeArgs.model_validate(_deployments(app)["Ingress"].init_args[2])
    assert (args.user_store.backend, args.user_store.timeout_s, args.user_store.url_env) == \
        ("redis", 2.0, "UUE_USER_STORE_URL")
    assert args.limits.max_top_k == 50 and args.limits.max_text_chars == 20_000
    with pytest.raises(ValidationError, match="user_store.bakend"):
        ServeArgs.model_validate({"model_dir": "m", "user_store.bakend": "redis"})
    with pytest.raises(ValidationError, match="is a value, not a section"):
        ServeArgs.model_validate({"model_dir": "m", "model_dir.x": "1"})


def test_serve_args_reject_unknown_keys_and_unfillable_batches():
    with pytest.raises(ValidationError, match="user_towr"):
        ServeArgs.model_validate({"model_dir": "m", "user_towr": {}})
    with pytest.raises(ValidationError, match="never batches more requests"):
        ServeArgs.model_validate({"model_dir": "m", "item_tower": {"max_batch_size": 64, "max_ongoing_requests": 5}})


def test_build_app_names_a_missing_model_folder(tmp_path):
    from serve.app import build_app

    with pytest.raises(FileNotFoundError, match="not a saved UUE model folder"):
        build_app(ServeArgs(model_dir=str(tmp_path / "nothing")))
