"""The README's serving commands, run as users run them (subprocesses of the `serve`/`ray` CLIs), answer
`/health` and the official `openai` client with the model's vectors:

- `serve run serve/config.local.yaml` with Ray started by `serve run` itself (2 CPUs: the config must fit),
- on a `ray start --head` cluster: `serve run serve.app:build_app model_dir=... index=...`, and `serve deploy`
  of the file (which needs `RAY_AUTH_MODE=token`, as `ray start` turns token
  authentication on).

The config is the repository's file with only `model_dir` and `index` pointed at a tiny model. Each start costs
20-40 s, so one model/index serves all and the head cluster is shared. Run under /tmp/uue-ray.lock.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
URL = "http://127.0.0.1:8000"  # serve/config.local.yaml's http_options, and Serve's default for import paths
STATEMENTS = ["loves hiking in the mountains", "enjoys cooking at home"]


def _cli(name: str, *args: str) -> list[str]:
    """The venv's console script, run by this interpreter (what its shebang does in an installed venv)."""
    return [sys.executable, str(BIN / name), *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session, sample_data_dir):
    """A tiny model, its index, the local config pointed at them, and the vectors the server must return."""
    from uue.config import ModelConfig
    from uue.index.build import build_index
    from uue.model import UUEModel
    from uue.model.inference import UUEInference

    root = tmp_path_factory.mktemp("serve-cli")
    UUEModel.from_config(ModelConfig(user_model_name="tiny", item_model_name="tiny", embedding_dim=16,
                                     attention_heads=4, max_chunk_length=32, max_statement_length=16,
                                     num_chunks_per_user=8), seed=7).save_pretrained(root / "model")
    build_index(root / "model", sample_data_dir, root / "index", min_actors=1, max_actors=1, batch_size=16,
                cpus_per_actor=0.5, progress=False)
    config = yaml.safe_load((REPO / "serve" / "config.local.yaml").read_text())
    config["applications"][0]["args"].update(model_dir=str(root / "model"), index=str(root / "index"))
    (root / "config.local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    local = UUEInference(root / "model", device="cpu")
    return {"root": root, "config": root / "config.local.yaml", "model": root / "model", "index": root / "index",
            "statements": local.encode_statements(STATEMENTS),
            "user": local.encode_users([["made fresh pasta tonight"]])[0]}


def _wait_healthy(process: subprocess.Popen | None, log: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.get(f"{URL}/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"no healthy /health within {timeout} s:\n{log.read_text()[-4000:]}")


def _check_answers(served: dict) -> None:
    import openai

    health = _wait_healthy(None, Path(os.devnull))
    assert health["status"] == "ok" and health["dimension"] == 16 and health["index"]["count"] == 16
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    statements = client.embeddings.create(model="uue-statements", input=STATEMENTS)
    np.testing.assert_allclose([d.embedding for d in statements.data], served["statements"], atol=1e-5)
    users = client.embeddings.create(model="uue-users", input=["made fresh pasta tonight"])
    np.testing.assert_allclose(users.data[0].embedding, served["user"], atol=1e-5)


def _serve_run(served: dict, args: list[str], env: dict[str, str], name: str) -> None:
    """`serve run ...` in the repository root until it serves, check the answers, then Ctrl-C it."""
    log = served["root"] / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(_cli("serve", "run", *args), cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        _wait_healthy(process, log)
        print(f"{name}: healthy {time.monotonic() - started:.0f} s after start")
        _check_answers(served)
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: serve shuts the app down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _wait_port_closed()


def _wait_port_closed(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{URL}/-/healthz", timeout=2)
        except httpx.HTTPError:
            return
        time.sleep(1)


def test_serve_run_local_config_starting_its_own_ray(served):
    """No cluster running: `serve run` starts Ray on this machine's 2 CPUs; every replica must fit.

    Its own RAY_TMPDIR, as on a fresh machine: Ray reads `<tmp>/ray/ray_current_cluster` to decide whether to
    attach instead, and a cluster another test (or a killed run) left behind must not be picked up."""
    temp_dir = tempfile.mkdtemp(prefix="uue-own-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        _serve_run(served, [str(served["config"])], _env(RAY_TMPDIR=temp_dir), "serve-run-own-ray")
    finally:
        _end_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(served):
    """`ray start --head` (2 CPUs, token authentication on) in its own temp dir; its processes are ended at
    the end, by the temp dir in their command lines (`ray stop` would end every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="uue-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    env = _env()
    started = subprocess.run(
        _cli("ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
             "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        _end_processes_mentioning(temp_dir)


def _end_processes_mentioning(text: str) -> None:
    mine = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    mine.append(int(proc.name))
            except OSError:
                continue
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_serve_run_import_path_on_a_ray_start_cluster(served, head):
    """The config file itself runs under `serve run` on its own Ray above and under `serve deploy` on this head."""
    env = _env(RAY_ADDRESS=head["address"], RAY_AUTH_MODE="token")
    _serve_run(served, ["serve.app:build_app", f"model_dir={served['model']}", f"index={served['index']}"], env,
               "serve-run-import-path-on-head")


def test_serve_deploy_on_a_ray_start_cluster_needs_ray_auth_mode_token(served, head):
    deploy = _cli("serve", "deploy", str(served["config"]), "-a", head["dashboard"])
    without = {k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}  # a driver's ray.init() may have set it
    refused = subprocess.run(deploy, cwd=REPO, env=without, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()
    env = _env(RAY_AUTH_MODE="token")
    done = subprocess.run(deploy, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        started = time.monotonic()
        log = served["root"] / "serve-deploy.log"
        log.write_text(done.stdout + done.stderr)
        _wait_healthy(None, log)
        print(f"serve deploy: healthy {time.monotonic() - started:.0f} s after deploy")
        _check_answers(served)
        # /health answers once one replica of each deployment runs; the app reads RUNNING when all have started.
        deadline = time.monotonic() + 180
        while True:
            status = subprocess.run(_cli("serve", "status", "-a", head["dashboard"]), cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=120)
            app = yaml.safe_load(status.stdout)["applications"]["uue"]
            if app["status"] != "DEPLOYING" or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert app["status"] == "RUNNING" and set(app["deployments"]) == {"Ingress", "UserTower", "ItemTower"}
        assert all(d["status"] == "HEALTHY" for d in app["deployments"].values())
    finally:
        subprocess.run(_cli("serve", "shutdown", "-y", "-a", head["dashboard"]), cwd=REPO, env=env,
                       capture_output=True, timeout=120)
        _wait_port_closed()
