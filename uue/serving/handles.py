"""Calling the tower deployments from the ingress so that a dying replica loses no request.

Ray Serve routes a new request away from a replica it knows is dead, but a request already running on a
replica that dies fails with `ActorDiedError`. Tower calls are pure functions of their input, so
`HandleBackend` retries them (the router then picks a live replica, or waits for the replacement the
controller starts); when the attempts run out, or Serve refuses the call outright (the deployment failed
to deploy, its queue is full), the client gets 503 in the OpenAI error shape with `Retry-After`, never a
bare 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from uue.data.schema import Statement, UserChunk, UserData
from uue.serving.api import RequestError

logger = logging.getLogger("ray.serve")

REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
"""The replica died or became unreachable while holding the request: safe to send it again."""
REFUSED = (DeploymentUnavailableError, BackPressureError)
"""Serve will not take the request now: retrying here would only queue it longer."""


class TowerUnavailableError(RequestError):
    """503 + Retry-After: no live replica of a tower answered."""

    def __init__(self, tower: str, reason: str, retry_after_s: int):
        super().__init__(503, f"{tower} is unavailable ({reason}); retry in {retry_after_s} s", None,
                         retry_after_s=retry_after_s)


async def call_tower(handle: DeploymentHandle, tower: str, method: str, arg: Any, *, attempts: int,
                     backoff_s: float, retry_after_s: int, on_retry: Callable[[str], None] | None = None) -> Any:
    """`await handle.<method>.remote(arg)`, sent again (up to `attempts` times in all) when its replica died."""
    for attempt in range(1, attempts + 1):
        try:
            return await getattr(handle, method).remote(arg)
        except REFUSED as err:
            raise TowerUnavailableError(tower, f"{type(err).__name__}: {err}", retry_after_s) from None
        except REPLICA_GONE as err:
            logger.warning("%s.%s: replica gone (attempt %d of %d): %s", tower, method, attempt, attempts,
                           type(err).__name__)
            if attempt == attempts:
                raise TowerUnavailableError(tower, f"{attempts} replicas failed in a row, last with "
                                                   f"{type(err).__name__}", retry_after_s) from None
            if on_retry is not None:
                on_retry(tower)
            await asyncio.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")


class HandleBackend:
    """`TowerBackend` over the tower deployments' handles (what the Serve ingress calls), with retries."""

    def __init__(self, user_tower: DeploymentHandle, item_tower: DeploymentHandle, *, attempts: int = 3,
                 backoff_s: float = 0.5, retry_after_s: int = 5, on_retry: Callable[[str], None] | None = None):
        self.user_tower, self.item_tower = user_tower, item_tower
        self.retry = {"attempts": attempts, "backoff_s": backoff_s, "retry_after_s": retry_after_s,
                      "on_retry": on_retry}

    async def embed_users(self, users: list[UserData]) -> np.ndarray:
        return await call_tower(self.user_tower, "UserTower", "embed", users, **self.retry)

    async def embed_statements(self, statements: list[Statement]) -> tuple[np.ndarray, list[int]]:
        return await call_tower(self.item_tower, "ItemTower", "embed", statements, **self.retry)

    # The user tower split at the chunk vectors (uue.serving.users.ChunkBackend): the user store's path.
    async def pool_users(self, users: list[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        return await call_tower(self.user_tower, "UserTower", "pool", users, **self.retry)

    async def leave_one_out(self, vectors: np.ndarray, metadata: dict | None) -> np.ndarray:
        return await call_tower(self.user_tower, "UserTower", "leave_one_out", (vectors, metadata), **self.retry)

    async def encode_and_pool(self, chunks: list[UserChunk], stored: np.ndarray | None, kept_new: list[int],
                              metadata: dict | None) -> tuple[np.ndarray, np.ndarray]:
        return await call_tower(self.user_tower, "UserTower", "encode_and_pool", (chunks, stored, kept_new, metadata),
                                **self.retry)
