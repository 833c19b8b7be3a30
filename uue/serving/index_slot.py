"""The statement index an ingress replica searches, swapped for a new version without downtime.

`IndexSlot` watches either an index folder (rebuilt in place by `build_index`, which renames a complete
folder over the old one) or a pointer file holding an index folder's path. `refresh()` loads a new version
completely before one reference assignment makes it current, so a request sees the old index or the new
one, never a mixture; a version that fails to load (half-written pointer, folder mid-rename, other model)
leaves the current index serving and is reported in `last_error`.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from uue.index.load import MANIFEST_FILE, StatementIndex

logger = logging.getLogger(__name__)


class IndexMismatchError(ValueError):
    """An index built with another item tower (or another dimension) than the served model."""


def point_index(pointer: str | Path, index_folder: str | Path) -> None:
    """Atomically make `pointer` name `index_folder` (write a temp file, then rename over the pointer)."""
    pointer = Path(pointer)
    tmp = pointer.with_name(f".{pointer.name}.tmp")
    tmp.write_text(str(Path(index_folder).resolve()) + "\n")
    tmp.replace(pointer)


class IndexSlot:
    def __init__(self, location: str | Path, model_fingerprint: str | None = None, dimension: int | None = None):
        self.location = Path(str(location).removeprefix("file://"))
        self.model_fingerprint = model_fingerprint
        self.dimension = dimension
        self.current: StatementIndex | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._lock = threading.Lock()  # one load at a time; readers never take it

    def resolve(self) -> Path:
        """The index folder the location names now (a folder itself, or the path inside a pointer file)."""
        if self.location.is_dir():
            return self.location
        if self.location.is_file():
            target = self.location.read_text().strip()
            if not target:
                raise FileNotFoundError(f"index pointer {self.location} is empty")
            path = Path(target.removeprefix("file://"))
            return path if path.is_absolute() else (self.location.parent / path)
        raise FileNotFoundError(f"index location {self.location}: no such folder or pointer file")

    def _is_current(self, folder: Path) -> bool:
        current = self.current
        if current is None or current.folder.resolve() != folder.resolve():
            return False
        try:
            version = json.loads((folder / MANIFEST_FILE).read_text()).get("version")
        except (OSError, json.JSONDecodeError):
            return True  # mid-rename or mid-write: keep serving what we have
        return version == current.version

    def refresh(self) -> bool:
        """Load the version the location names if it differs from the current one; True when swapped.

        Raises on a bad new version (and records it in `last_error`); the current index stays in place.
        """
        with self._lock:
            try:
                folder = self.resolve()
                if self._is_current(folder):
                    return False
                index = StatementIndex.load(folder)
                self._check(index)
            except Exception as err:
                self.last_error = f"{type(err).__name__}: {err}"
                raise
            previous = self.current
            self.current = index  # the swap: one reference assignment
            self.last_error = None
            self.swaps += 1
            logger.info("statement index %s -> %s (%d statements)",
                        previous.version if previous else None, index.version, len(index))
            return True

    def _check(self, index: StatementIndex) -> None:
        if self.dimension is not None and index.dimension != self.dimension:
            raise IndexMismatchError(
                f"index {index.folder} has dimension {index.dimension}, the served model {self.dimension}"
            )
        if self.model_fingerprint is not None and index.checkpoint_fingerprint != self.model_fingerprint:
            raise IndexMismatchError(
                f"index {index.folder} (version {index.version}) was built with checkpoint "
                f"{index.checkpoint_fingerprint[:12]}, the served model is {self.model_fingerprint[:12]}: "
                "rebuild the index with this model, or deploy the model it was built with"
            )

    def status(self) -> dict:
        current = self.current
        return {
            "location": str(self.location),
            "version": current.version if current else None,
            "count": len(current) if current else 0,
            "folder": str(current.folder) if current else None,
            "swaps": self.swaps,
            "last_error": self.last_error,
        }
