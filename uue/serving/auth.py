"""Who may read, write and delete stored users: API keys from the environment, compared in constant time.

    UUE_API_KEYS="k3y-for-the-app,k3y-for-dashboards:ro"      (on a cluster: from a Kubernetes secret)

A request sends `Authorization: Bearer <key>`. Missing or unknown key: 401; a `:ro` (read-only) key on a
route that writes or deletes: 403. Keys are checked before anything is read or changed, so a refused
request changes nothing. Every configured key is compared (`hmac.compare_digest`) on every request, so
the time taken says nothing about which key, or how much of one, matched. No keys configured: every
stored-user request is refused with 401 saying so (stored histories are personal data; there is no
open mode).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi.security import HTTPBearer

from uue.serving.api import RequestError

READ_ONLY_SUFFIX = ":ro"

API_KEY = HTTPBearer(scheme_name="ApiKey", auto_error=False, description=(
    "An API key from the server's `UUE_API_KEYS` (`KEY:ro` keys read only). Required on the /users routes; "
    "on /score, /retrieve and /v1/embeddings only with `user_id` (or `input_type: user_id`)."))
"""The OpenAPI security scheme of the stored-user key: routes that depend on it declare it (the check is
`ApiKeys.check`, which also names what is wrong with a refused header)."""
ADMIN_TOKEN = HTTPBearer(scheme_name="AdminToken", auto_error=False, description=(
    "The admin token from the server's `UUE_ADMIN_TOKEN` (declared only when the server has one; without one "
    "the /admin routes answer loopback clients only)."))


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[tuple[bytes, bool], ...] = ()
    """(key, may write) pairs."""
    source: str = "UUE_API_KEYS"

    @classmethod
    def parse(cls, value: str | None, source: str = "UUE_API_KEYS") -> ApiKeys:
        """`KEY[,KEY:ro]...`; blanks around commas are ignored, an empty key is an error."""
        keys = []
        for n, part in enumerate((value or "").split(",")):
            part = part.strip()
            if not part:
                continue
            read_only = part.endswith(READ_ONLY_SUFFIX)
            key = part.removesuffix(READ_ONLY_SUFFIX) if read_only else part.removesuffix(":rw")
            if not key:
                raise ValueError(f"{source}: entry {n} has an empty key")
            keys.append((key.encode("utf-8"), not read_only))
        return cls(tuple(keys), source)

    @classmethod
    def from_env(cls, name: str = "UUE_API_KEYS") -> ApiKeys:
        return cls.parse(os.environ.get(name), source=name)

    def check(self, authorization: str | None, write: bool) -> None:
        """Raise 401/403 (`RequestError`) unless `authorization` carries a key allowed to do this."""
        if not self.keys:
            raise RequestError(401, f"stored users need an API key and none is configured (set {self.source} "
                                    "on the server: comma-separated keys, KEY:ro for read-only)", "authorization")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "stored users need 'Authorization: Bearer <API key>'", "authorization")
        sent = token.strip().encode("utf-8")
        may_write = None
        for key, writer in self.keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(sent, key):
                may_write = writer
        if may_write is None:
            raise RequestError(401, "unknown API key", "authorization")
        if write and not may_write:
            raise RequestError(403, "this API key is read-only (:ro): it may not write or delete users",
                               "authorization")
