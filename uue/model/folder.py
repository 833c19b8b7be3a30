"""A saved model folder on disk: finding it from what a user points at, reading its config, fingerprinting its
weights.

Light on purpose (no torch): the index build's driver and the serving ingress need these without loading
a model. The weights are written and read by uue.model.uue_model.

Format versions: 1 recorded the flat dump of every ModelConfig key; 2 records the sections that using the
model needs (ModelConfig.saved). Both load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from uue.config import ModelConfig

FORMAT_VERSION = 2


def read_meta(path: Path, expected_format: str) -> dict[str, Any]:
    """uue.json ("uue-model") or tower.json ("uue-tower"), refused when it is another file or a newer version."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a saved UUE {expected_format} folder")
    meta = json.loads(path.read_text())
    if meta.get("format") != expected_format or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: expected format {expected_format!r} version <= {FORMAT_VERSION}, got {meta}")
    return meta


def read_tower_config(tower_folder: str | Path) -> ModelConfig:
    """The ModelConfig a tower folder was saved with (either format version)."""
    return ModelConfig.from_saved(read_meta(Path(tower_folder) / "tower.json", "uue-tower")["model_config"])


def read_output_dim(tower_folder: str | Path) -> int:
    """Width of a saved tower's vectors without loading it: embedding_dim, plus what a fitted pretrained path adds
    (uue.model.pretrained_path)."""
    from safetensors import safe_open

    from uue.model.pretrained_path import saved_width

    with safe_open(str(Path(tower_folder) / "head.safetensors"), framework="pt") as head:
        return read_tower_config(tower_folder).towers.embedding_dim + saved_width(head)


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
