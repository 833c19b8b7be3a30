"""Typed arguments of the Serve application (the `args:` block of serve/config.*.yaml).

`ServeArgs` is what `serve run serve.app:build_app key=value` and `serve deploy` validate before any
replica starts, so a typo in a config fails at deploy time with the key's path, not in a replica log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RequestLimits(_Strict):
    """Bounds on one HTTP request; anything beyond gets a 4xx that names the field and the bound."""

    max_request_bytes: int = Field(2_000_000, gt=0)
    """Bodies larger than this get 413 before they are parsed."""
    max_users_per_request: int = Field(32, gt=0)
    max_chunks_per_user: int = Field(1000, gt=0)
    """Chunks a request may send per user; the user tower keeps the `num_chunks_per_user` most recent."""
    max_statements_per_request: int = Field(256, gt=0)
    max_text_chars: int = Field(20_000, gt=0)
    """Characters per chunk or statement (tokens past the model's max length are truncated anyway)."""
    max_top_k: int = Field(100, gt=0)


class _Replicas(_Strict):
    """How many replicas of a deployment Serve's autoscaler runs, and how much each takes on."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(16, gt=0)
    max_ongoing_requests: int = Field(64, gt=0)
    """Raised above Serve's default (5): a replica never batches more requests than it holds at once."""

    @model_validator(mode="after")
    def _check(self) -> _Replicas:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def autoscaling_config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


class TowerDeploymentArgs(_Replicas):
    """Replicas, resources and dynamic batching of one tower deployment."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(64, gt=0)
    """Batch budget: chunks for the user tower (tokens <= chunks x max_chunk_length), statements for the item tower."""
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    device: str | None = None
    """"cpu", "cuda", "cuda:1"... (None: cuda when the replica has a GPU, else cpu)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def ray_actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class IngressArgs(_Replicas):
    """The FastAPI ingress: HTTP parsing, validation, index search (cheap work, CPU only)."""

    num_cpus: float = Field(0.5, ge=0)
    target_ongoing_requests: float = Field(32, gt=0)
    max_ongoing_requests: int = Field(128, gt=0)


class UserStoreArgs(_Strict):
    """Stored users (`/users/...`, `user_id` in /score, /retrieve, /v1/embeddings): where, and what is kept.

    SQLite is one file on one node (every ingress replica there shares it); on a multi-node cluster use
    Redis, which every replica on every node reaches. The requests need `Authorization: Bearer <API key>`
    with keys from the environment variable `api_keys_env` (see uue.serving.auth)."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str = "users.sqlite"
    """The SQLite file (backend sqlite); a relative path is pinned to where the app is built."""
    url: str | None = None
    """redis://host:port/db (backend redis); `url_env`, when set in the environment, takes precedence."""
    url_env: str = "UUE_USER_STORE_URL"
    """Environment variable holding the Redis URL (with its password: a Kubernetes secret)."""
    key_prefix: str = "uue:user:"
    """Redis keys are `<key_prefix>{<user_id>}`, one hash per user."""
    store_text: bool = False
    """Keep each chunk's text too. Off (the default): only a hash of it (keyed with `text_hash_key_env`)."""
    text_hash_key_env: str = "UUE_TEXT_HASH_KEY"
    """Environment variable with the key of the chunk text hash (unset: an unkeyed blake2b)."""
    api_keys_env: str = "UUE_API_KEYS"
    """Environment variable with the API keys: `KEY,KEY:ro` (`:ro` = read-only)."""
    timeout_s: float = Field(5.0, gt=0)
    """How long one store call may wait (Redis connect or reply, SQLite's write lock) before the request gets
    503 with `Retry-After` (`retry_after_s`); the store is not retried inside the request."""

    @model_validator(mode="after")
    def _pin(self) -> UserStoreArgs:
        # Replicas may start in another working directory: pin the file to where the app was built.
        if self.backend == "sqlite" and "://" not in self.path:
            self.path = str(Path(self.path).resolve())
        return self


class ServeArgs(_Strict):
    """Everything the UUE Serve application needs; validated by Serve's typed app builder."""

    model_dir: str
    """A saved UUE model folder (uue.json, user_tower/, item_tower/, optionally calibration.json)."""
    index: str | None = None
    """An index folder (manifest.json, index.usearch, vectors/) or a pointer file holding such a folder's
    path: rewriting the pointer swaps the index in every ingress replica without downtime."""
    index_poll_s: float = Field(2.0, gt=0)
    """How often ingress replicas re-read the index pointer."""
    statement_model_name: str = "uue-statements"
    """The `model` name of `/v1/embeddings` for statement vectors."""
    user_model_name: str = "uue-users"
    """The `model` name of `/v1/embeddings` where each input string is one user's whole history."""
    admin_token_env: str = "UUE_ADMIN_TOKEN"
    """The environment variable (in the ingress replicas' environment: runtime_env `env_vars` or a
    Kubernetes secret) holding the bearer token of the `/admin/*` routes. Set, they require
    `Authorization: Bearer <token>`; unset, they answer loopback clients (127.0.0.1, ::1) only."""
    tower_call_attempts: int = Field(3, ge=1)
    """How often the ingress sends a tower call in all when the replica holding it dies (calls are pure)."""
    retry_after_s: int = Field(5, ge=1)
    """`Retry-After` of the 503 a client gets when no tower replica answered, or the user store did not."""
    limits: RequestLimits = RequestLimits()
    # Defaults fit a 2-CPU machine (`serve run serve.app:build_app model_dir=...` with nothing else): one
    # replica each reserves 0.4 + 0.4 + 0.2 CPUs, everything at max_replicas 2.0 (num_cpus is a scheduling share).
    user_tower: TowerDeploymentArgs = TowerDeploymentArgs(num_cpus=0.4, max_batch_size=256, max_ongoing_requests=256)
    item_tower: TowerDeploymentArgs = TowerDeploymentArgs(num_cpus=0.4)
    ingress: IngressArgs = IngressArgs(num_cpus=0.2)
    user_store: UserStoreArgs | None = None
    """Stored users; None: the /users routes and `user_id` inputs answer 503 (nothing is stored)."""

    @model_validator(mode="before")
    @classmethod
    def _nest_dotted_keys(cls, data: Any) -> Any:
        """`serve run serve.app:build_app ... user_store.backend=redis`: the command line's key=value pairs are
        flat, so a dotted key sets one field of a section (the YAML's nested `args:` need none of this)."""
        if not isinstance(data, dict) or not any("." in str(key) for key in data):
            return data
        nested: dict[str, Any] = {}
        for key, value in sorted(data.items(), key=lambda item: "." in str(item[0])):  # sections first
            *sections, name = str(key).split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{key}: {section} is a value, not a section")
            node[name] = dict(value) if isinstance(value, dict) else value  # never change the caller's dict
        return nested

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        for name in ("user_tower", "item_tower"):
            tower: TowerDeploymentArgs = getattr(self, name)
            # Serve warns (and single-item requests can never fill a batch) below this bound.
            if tower.max_ongoing_requests < tower.max_batch_size:
                raise ValueError(
                    f"{name}.max_ongoing_requests ({tower.max_ongoing_requests}) < max_batch_size "
                    f"({tower.max_batch_size}): a replica never batches more requests than it holds at once"
                )
        if self.statement_model_name == self.user_model_name:
            raise ValueError("statement_model_name and user_model_name must differ")
        return self
