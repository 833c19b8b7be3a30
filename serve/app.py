"""The UUE Ray Serve application: user-tower and item-tower deployments behind one FastAPI ingress.

    serve run serve/config.local.yaml                      # or: serve run serve.app:build_app model_dir=...
    RAY_AUTH_MODE=token serve deploy serve/config.gpu.yaml # on a running cluster (KubeRay: cluster/rayservice.yaml)

Each tower is its own deployment with its own autoscaling and `@serve.batch` dynamic batching (the user
tower's batches are bounded by a chunk budget, the item tower's by a statement count); the ingress
validates requests, calls the towers through `DeploymentHandle`s and searches the statement index, which
it swaps for a new version without downtime (see `uue.serving.index_slot`). Logic lives in `uue.serving`.
"""

# No `from __future__ import annotations` here: Ray Serve reads `build_app`'s parameter annotation at
# runtime (`inspect.signature`, not `typing.get_type_hints`) and converts the `args:` dict only when it is
# the `ServeArgs` class itself, not the string 'ServeArgs'.
import asyncio
import logging
import os
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from uue.data.schema import Statement, UserChunk, UserData
from uue.serving.encoders import StatementEncoder, UserEncoder
from uue.serving.settings import ServeArgs

logger = logging.getLogger("ray.serve")


def _chunks_in(users: list[UserData]) -> int:
    """The user tower's batch budget counts chunks (tokens <= chunks x max_chunk_length), not requests."""
    return sum(len(user.chunks) for user in users)


@serve.deployment(name="UserTower")
class UserTowerDeployment:
    """Users -> vectors; concurrent users are batched up to `max_batch_size` chunks per forward pass."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float,
                 device: str | None = None, dtype: str = "float32"):
        from ray.serve.metrics import Counter

        self.encoder = UserEncoder(model_dir, device=device, dtype=dtype)
        if max_batch_size < self.encoder.config.towers.num_chunks_per_user:
            raise ValueError(f"user_tower.max_batch_size ({max_batch_size} chunks) must hold one user's "
                             f"num_chunks_per_user ({self.encoder.config.towers.num_chunks_per_user})")
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._encode_chunks.set_max_batch_size(max_batch_size)
        self._encode_chunks.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.chunks_encoded = Counter("uue_user_tower_chunks_total", description="Chunks encoded by the user tower.")
        self.stats = {"batches": 0, "users": 0, "largest_batch_users": 0, "largest_batch_chunks": 0}

    async def embed(self, users: list[UserData]) -> np.ndarray:
        kept = [self.encoder.kept_chunks(user) for user in users]
        return np.stack(await asyncio.gather(*(self._encode_batch(user) for user in kept)))

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_chunks_in)
    async def _encode_batch(self, users: list[UserData]) -> list[np.ndarray]:
        vectors = await asyncio.to_thread(self.encoder.encode, users)  # the event loop keeps queueing meanwhile
        chunks = _chunks_in(users)
        self.chunks_encoded.inc(chunks)
        stats = self.stats
        stats["batches"] += 1
        stats["users"] += len(users)
        stats["largest_batch_users"] = max(stats["largest_batch_users"], len(users))
        stats["largest_batch_chunks"] = max(stats["largest_batch_chunks"], chunks)
        return list(vectors)

    # The user store's calls (uue.serving.users): new chunks alone, batched across users up to max_batch_size
    # chunks; pooling from stored chunk vectors (no encoder pass).
    async def chunk_vectors(self, chunks: list[UserChunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.encoder.hidden_size), np.float32)
        return np.stack(await asyncio.gather(*(self._encode_chunks(chunk) for chunk in chunks)))

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005)
    async def _encode_chunks(self, chunks: list[UserChunk]) -> list[np.ndarray]:
        vectors = await asyncio.to_thread(self.encoder.chunk_vectors, chunks)
        self.chunks_encoded.inc(len(chunks))
        self.stats["chunk_batches"] = self.stats.get("chunk_batches", 0) + 1
        self.stats["chunks_alone"] = self.stats.get("chunks_alone", 0) + len(chunks)
        return list(vectors)

    async def pool(self, users: list[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.pool, users)

    async def leave_one_out(self, user: tuple[np.ndarray, dict | None]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.leave_one_out, *user)

    async def encode_and_pool(self, append: tuple) -> tuple[np.ndarray, np.ndarray]:
        """An append in one call: (chunks, stored vectors, kept new positions, metadata) -> (vectors, user)."""
        chunks, stored, kept_new, metadata = append
        encoded = await self.chunk_vectors(chunks)  # batched with other users' new chunks
        return encoded, await asyncio.to_thread(self.encoder.pool_appended, encoded, stored, kept_new, metadata)

    def info(self) -> dict:
        return {**self.encoder.info(), **self.stats}


@serve.deployment(name="ItemTower")
class ItemTowerDeployment:
    """Statements -> vectors; concurrent statements are batched up to `max_batch_size` per forward pass."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float,
                 device: str | None = None, dtype: str = "float32"):
        self.encoder = StatementEncoder(model_dir, device=device, dtype=dtype)
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.stats = {"batches": 0, "statements": 0, "largest_batch": 0}

    async def embed(self, statements: list[Statement]) -> tuple[np.ndarray, list[int]]:
        results = await asyncio.gather(*(self._encode_batch(s) for s in statements))
        return np.stack([vector for vector, _ in results]), [tokens for _, tokens in results]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, statements: list[Statement]) -> list[tuple[np.ndarray, int]]:
        vectors, tokens = await asyncio.to_thread(self.encoder.encode, statements)
        self.stats["batches"] += 1
        self.stats["statements"] += len(statements)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(statements))
        return list(zip(vectors, tokens, strict=True))

    def info(self) -> dict:
        return {**self.encoder.info(), **self.stats}


@serve.deployment(name="Ingress")
@serve.ingress()
class UUEIngress:
    """HTTP front: validation, tower calls, index search, index hot swap, metrics."""

    async def __init__(self, user_tower: DeploymentHandle, item_tower: DeploymentHandle, args: dict):
        from uue.evaluation.calibration import PlattCalibrator
        from uue.model.folder import checkpoint_fingerprint
        from uue.serving.handles import HandleBackend
        from uue.serving.http import ServingService
        from uue.serving.index_slot import IndexSlot
        from uue.serving.metrics import ServingMetrics

        self.args = ServeArgs.model_validate(args)
        user_info, item_info = await asyncio.gather(user_tower.info.remote(), item_tower.info.remote())
        if user_info["dimension"] != item_info["dimension"]:
            raise ValueError(f"towers disagree on dimension: {user_info} vs {item_info}")
        fingerprint = await asyncio.to_thread(checkpoint_fingerprint, self.args.model_dir)
        metrics = ServingMetrics()
        index = None
        if self.args.index:
            index = IndexSlot(self.args.index, model_fingerprint=fingerprint, dimension=user_info["dimension"])
            await asyncio.to_thread(index.refresh)  # a replica without its index is not ready: fail loudly
            metrics.record_index(len(index.current), swapped=False)
        self.service = ServingService(
            backend=HandleBackend(user_tower, item_tower, attempts=self.args.tower_call_attempts,
                                  retry_after_s=self.args.retry_after_s, on_retry=metrics.record_tower_retry),
            model_fingerprint=fingerprint,
            dimension=user_info["dimension"], limits=self.args.limits,
            statement_model_name=self.args.statement_model_name, user_model_name=self.args.user_model_name,
            calibrator=PlattCalibrator.load(self.args.model_dir), index=index, metrics=metrics,
            admin_token=os.environ.get(self.args.admin_token_env) or None, retry_after_s=self.args.retry_after_s,
        )
        self.service.num_chunks_per_user = user_info["num_chunks_per_user"]
        if self.args.user_store is not None:
            from uue.serving.users import open_user_service

            self.service.users, self.service.api_keys = await asyncio.to_thread(
                open_user_service, self.args.user_store, self.service.backend, fingerprint,
                self.service.num_chunks_per_user)
        self._poller = asyncio.get_running_loop().create_task(self._poll_index()) if index else None

    async def _poll_index(self) -> None:
        """Re-read the index location every `index_poll_s`; a swap is one reference assignment."""
        index = self.service.index
        while True:
            await asyncio.sleep(self.args.index_poll_s)
            try:
                swapped = await asyncio.to_thread(index.refresh)
                self.service.metrics.record_index(len(index.current), swapped)
            except Exception as err:  # keep serving the current version; /health shows last_error
                logger.warning("index refresh failed, still serving %s: %s", index.status()["version"], err)

    def __serve_build_asgi_app__(self):
        from uue.serving.http import build_http_app

        return build_http_app(self.service)

    async def check_health(self) -> None:
        if self._poller is not None and self._poller.done():
            raise RuntimeError(f"index poller stopped: {self._poller.exception()!r}")


def build_app(args: ServeArgs) -> serve.Application:
    """Typed app builder: `serve run serve.app:build_app model_dir=... index=...` or the YAML `args:`.

    Serve passes `args` already validated as `ServeArgs`; a plain dict (a direct call) is validated here.
    """
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    if not (Path(args.model_dir) / "uue.json").is_file():
        raise FileNotFoundError(f"model_dir {args.model_dir}: no uue.json (not a saved UUE model folder)")
    # Replicas may start in another working directory: pin relative paths to where the app was built.
    args = args.model_copy(update={"model_dir": str(Path(args.model_dir).resolve()),
                                   "index": str(Path(args.index).resolve()) if args.index and "://" not in args.index
                                   else args.index})
    towers = []
    for name, deployment in (("user_tower", UserTowerDeployment), ("item_tower", ItemTowerDeployment)):
        tower = getattr(args, name)
        towers.append(deployment.options(
            autoscaling_config=tower.autoscaling_config(),
            max_ongoing_requests=tower.max_ongoing_requests,
            ray_actor_options=tower.ray_actor_options(),
        ).bind(args.model_dir, tower.max_batch_size, tower.batch_wait_timeout_s, tower.device, tower.dtype))
    return UUEIngress.options(
        autoscaling_config=args.ingress.autoscaling_config(),
        max_ongoing_requests=args.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.ingress.num_cpus},
    ).bind(towers[0], towers[1], args.model_dump())
