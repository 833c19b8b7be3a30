"""The Serve config YAMLs and the RayService manifest resolve: import paths, typed args, the same app."""

from __future__ import annotations

import importlib
import typing
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


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_a_valid_serve_deploy_config_with_typed_args(path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` check first
    (app,) = config["applications"]
    builder = _resolve(app["import_path"])
    assert typing.get_type_hints(builder)["args"] is ServeArgs  # Serve validates `args` with this model
    args = ServeArgs.model_validate(app["args"])
    for tower in (args.user_tower, args.item_tower):
        assert tower.max_ongoing_requests >= tower.max_batch_size > 0
        assert 0 < tower.autoscaling_config()["min_replicas"] <= tower.autoscaling_config()["max_replicas"]


def test_rayservice_embeds_the_gpu_serve_config():
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    gpu = yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())
    assert embedded["applications"] == gpu["applications"]
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == importlib.import_module("ray").__version__


def test_serve_args_reject_unknown_keys_and_unfillable_batches():
    with pytest.raises(ValidationError, match="user_towr"):
        ServeArgs.model_validate({"model_dir": "m", "user_towr": {}})
    with pytest.raises(ValidationError, match="never batches more requests"):
        ServeArgs.model_validate({"model_dir": "m", "item_tower": {"max_batch_size": 64, "max_ongoing_requests": 5}})


def test_build_app_names_a_missing_model_folder(tmp_path):
    from serve.app import build_app

    with pytest.raises(FileNotFoundError, match="not a saved UUE model folder"):
        build_app(ServeArgs(model_dir=str(tmp_path / "nothing")))
