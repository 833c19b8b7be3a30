"""Both towers in one process behind the same HTTP API: the bare FastAPI + uvicorn peer of the benchmark,
and a quick way to serve a model without Ray (`uvicorn` on `build_local_app(...)`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from uue.data.schema import Statement, UserChunk, UserData
from uue.evaluation.calibration import PlattCalibrator
from uue.serving.encoders import StatementEncoder, UserEncoder
from uue.serving.settings import RequestLimits, UserStoreArgs


class InProcessBackend:
    """`TowerBackend` running each request's encode in a worker thread (FastAPI's usual pattern), unbatched."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
        self.users = UserEncoder(model_dir, device=device, dtype=dtype)
        self.statements = StatementEncoder(model_dir, device=device, dtype=dtype)

    async def embed_users(self, users: list[UserData]) -> np.ndarray:
        return await asyncio.to_thread(self.users.encode, [self.users.kept_chunks(u) for u in users])

    async def embed_statements(self, statements: list[Statement]) -> tuple[np.ndarray, list[int]]:
        return await asyncio.to_thread(self.statements.encode, statements)

    # The user tower split at the chunk vectors (uue.serving.users.ChunkBackend): the user store's path.
    async def pool_users(self, users: list[tuple[np.ndarray, dict | None]]) -> np.ndarray:
        return await asyncio.to_thread(self.users.pool, users)

    async def leave_one_out(self, vectors: np.ndarray, metadata: dict | None) -> np.ndarray:
        return await asyncio.to_thread(self.users.leave_one_out, vectors, metadata)

    async def encode_and_pool(self, chunks: list[UserChunk], stored: np.ndarray | None, kept_new: list[int],
                              metadata: dict | None) -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.to_thread(self.users.encode_and_pool, chunks, stored, kept_new, metadata)


def build_local_app(model_dir: str | Path, limits: RequestLimits | None = None, device: str | None = None,
                    dtype: str = "float32", index: str | None = None,
                    admin_token: str | None = None, user_store: UserStoreArgs | None = None) -> FastAPI:
    """`user_store`: stored users (their API keys come from the env var it names, as under Serve)."""
    from uue.model.folder import checkpoint_fingerprint
    from uue.serving.http import ServingService, build_http_app
    from uue.serving.index_slot import IndexSlot
    from uue.serving.users import open_user_service

    backend = InProcessBackend(model_dir, device=device, dtype=dtype)
    fingerprint = checkpoint_fingerprint(model_dir)
    slot = None
    if index:
        slot = IndexSlot(index, model_fingerprint=fingerprint, dimension=backend.users.dimension)
        slot.refresh()
    service = ServingService(
        backend=backend, model_fingerprint=fingerprint, dimension=backend.users.dimension,
        limits=limits or RequestLimits(), calibrator=PlattCalibrator.load(model_dir), index=slot,
        admin_token=admin_token, num_chunks_per_user=backend.users.config.towers.num_chunks_per_user,
    )
    if user_store is not None:
        service.users, service.api_keys = open_user_service(user_store, backend, fingerprint,
                                                            service.num_chunks_per_user)
    return build_http_app(service)
