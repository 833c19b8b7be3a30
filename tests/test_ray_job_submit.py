"""The cluster path end to end: `ray start --head` on 127.0.0.1, then preprocess, train and evaluate through
`ray job submit --working-dir . -- python -m ray_jobs.<job>`, with token authentication on.

The head runs on non-default ports with its own --temp-dir, in its own process group, and is stopped by
terminating that group: `ray stop` would also stop every other Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RUNTIME_ENV = "ray_jobs/runtime_env.yaml"
CONFIG = "configs/tiny.yaml"
"""The README's recipe's config: random tiny towers, which learn the training users' labels within a few steps
(not enough to generalise to the 8 test users, whose 64 labels leave the comparison to noise)."""


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _descendants(root: int) -> list[int]:
    """All processes below `root` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RayHead:
    """`ray start --head --block` as a child process group, with token authentication."""

    def __init__(self, num_cpus: int = 4):
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_port, self.agent_grpc_port,
         self.runtime_env_port, self.metrics_port, self.node_manager_port, self.object_manager_port) = _free_ports(9)
        # A short path: Ray puts Unix sockets under the temp dir, and those paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="uue-ray-", dir="/tmp")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Each head gets its own token (not ~/.ray/auth_token), so parallel runs never share or overwrite one.
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(var, None)
        # Every process of this cluster inherits the head's environment: with RAY_ADDRESS set, Ray's internal
        # state-API clients connect here instead of failing on "multiple active Ray instances" when other Ray
        # clusters run on the same machine.
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{self.gcs_port}"
        # A DeepSpeed kernel build killed midway leaves its lock behind, and torch waits on that lock forever:
        # training on CPU must not build the kernel (uue.train.ray.skip_cpu_shared_memory_build), so it must finish.
        self.env["TORCH_EXTENSIONS_DIR"] = os.path.join(self.temp_dir, "torch_extensions")
        stale_build = Path(self.env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
        stale_build.mkdir(parents=True)
        (stale_build / "lock").touch()
        self.log_path = Path(self.temp_dir) / "head.log"
        command = [
            RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
            f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}", f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}", f"--num-cpus={num_cpus}",
            "--object-store-memory=500000000", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(command, env=self.env, cwd=REPO_ROOT, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def ray(self, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def wait_for_job_api(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            result = self.ray("job", "list", "--address", self.address, timeout=60)
            if result.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"job API at {self.address} not up after {timeout}s:\n{self.log_path.read_text()}")

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.ray("job", "submit", "--address", self.address, "--working-dir", ".",
                        "--runtime-env", RUNTIME_ENV, "--", *entrypoint, timeout=timeout)

    def stop(self) -> list[int]:
        """Terminate the head's process group (its GCS, raylet, dashboard and workers), then clean up.

        Returns the processes of this cluster still alive afterwards (killed by pid, so none is left behind).
        """
        cluster = _descendants(self.process.pid)
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)  # a test cluster: no need to wait for a graceful drain
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        time.sleep(1)
        try:  # anything of the group that outlived the head
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15  # a process outside the group may still be on its way out
        while (survivors := [pid for pid in cluster if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors


def _check(result: subprocess.CompletedProcess, what: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture
def ray_head():
    head = RayHead()
    try:
        head.wait_for_job_api()
        yield head
    finally:
        survivors = head.stop()
    assert not survivors, f"processes of the test's Ray cluster outlived its process group: {survivors}"


def test_preprocess_train_evaluate_through_ray_job_submit(ray_head, tmp_path):
    from uue.model.uue_model import UUEModel

    # Authentication is on: a client without RAY_AUTH_MODE=token is turned away.
    anonymous = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = ray_head.ray("job", "list", "--address", ray_head.address, env=anonymous, timeout=60)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()

    # Outputs go to absolute paths: a job runs in an unpacked copy of the working dir that Ray deletes later.
    preprocessed, run, evaluation = tmp_path / "preprocessed", tmp_path / "run", tmp_path / "eval"
    output = _check(ray_head.submit(
        "python", "-m", "ray_jobs.preprocess", "--input", "uue/data/sample_data", "--output", str(preprocessed),
        "--config", CONFIG, "--max-actors", "1", "--max-rejects", "0"), "preprocess job")
    assert "succeeded" in output
    manifest = json.loads((preprocessed / "manifest.json").read_text())
    assert {t: c["written"] for t, c in manifest["tables"].items()} == {"users": 48, "statements": 16, "labels": 384}
    assert manifest["rejects"]["count"] == 0 and manifest["counts"]["train_users"] == 32

    # The README's recipe: training streams the preprocessed shards (not the raw folder).
    _check(ray_head.submit(
        "python", "-m", "ray_jobs.train", "--config", CONFIG, f"data.path={preprocessed}",
        f"training.output_dir={run}", "training.max_steps=6", "model.batch_size=4", "distributed.num_workers=2",
        "distributed.zero_stage=2"), "train job")
    model = UUEModel.from_pretrained(run / "model")
    assert model.config.user_model_name == "tiny"

    _check(ray_head.submit(
        "python", "-m", "ray_jobs.evaluate", "--model", str(run), "--data", "uue/data/sample_data",
        "--out", str(evaluation), "--split", "train"), "evaluate job")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    # Six steps of 2 workers x 4 users must have fitted the training users' labels better than the untrained
    # towers with mean pooling do (measured on one process: 0.51-0.55 against the baseline's 0.47, two seeds).
    assert metrics["overall"]["labels"] == 256  # the 32 training users' labels
    assert metrics["overall"]["auc"] > metrics["baseline"]["overall"]["auc"], (
        metrics["overall"]["auc"], metrics["baseline"]["overall"]["auc"])

