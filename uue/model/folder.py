"""A saved model folder on disk: finding it from what a user points at, and fingerprinting its weights.

Light on purpose (no torch): the index build's driver and the serving ingress need these without loading
a model. What the folder holds is written and read by uue.model.uue_model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, a checkpoint folder (step_N/model) or a training output_dir (its model/)."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "uue.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} is not a UUE model folder (no uue.json in it or in {path}/model)")


def resolve_item_tower(checkpoint: str | Path) -> tuple[Path, Path]:
    """(folder whose weights are fingerprinted, item tower folder) for a model, checkpoint or tower folder.

    Accepts a model folder (uue.json + item_tower/), a training checkpoint `step_N/` or output dir (which
    hold `model/`), or an item tower folder itself.
    """
    folder = Path(checkpoint)
    for candidate in (folder, folder / "model"):
        if (candidate / "uue.json").is_file() and (candidate / "item_tower" / "tower.json").is_file():
            return candidate, candidate / "item_tower"
    tower_json = folder / "tower.json"
    if tower_json.is_file() and json.loads(tower_json.read_text()).get("tower") == "item":
        return folder, folder
    raise FileNotFoundError(
        f"checkpoint {checkpoint}: not a UUE model folder (uue.json + item_tower/), a checkpoint holding model/, "
        "or an item tower folder (tower.json with tower=item)"
    )


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over the weight files (*.safetensors, by relative path and content) of a model folder.

    The serving side computes the same value for the model it loaded, to tell whether an index was built
    with the same item tower.
    """
    folder = Path(folder)
    if folder.is_dir() and not (folder / "tower.json").is_file():
        folder = resolve_item_tower(folder)[0]
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
