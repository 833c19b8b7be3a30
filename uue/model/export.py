"""Export the item tower for tools outside UUE: a sentence-transformers folder.

`model/item_tower/backbone` alone is the fine-tuned transformer without the trained head (pooling choice,
metadata fusion, projection in `head.safetensors`), so its vectors are not the item tower's. The export
writes the whole statement path as sentence-transformers modules:

    Transformer(backbone, max_seq_length = max_statement_length) -> Pooling(mean | lasttoken, as trained)
    -> Dense(projection, no activation) -> Normalize()

The projection is folded into one `Dense`: a low-rank residual head (x + up(down(x))) becomes
I + up @ down, and with item metadata fusion on, the fusion of *no metadata* (a constant vector added to the
pooled text) moves into the bias. So `SentenceTransformer(out).encode(texts)` equals the item tower on
statements without metadata or context (UUE encodes a context as a second segment; metadata changes the
vector): that is the contract `uue export` tests.

UUE drops BERT's [CLS] pooler (mean pooling never reads it), so when sentence-transformers loads the backbone
transformers initialises `pooler.dense.*` and logs a LOAD REPORT calling them MISSING, which looks like an
error and is not. The export silences that report and checks the loaded weights itself: every saved weight
must be loaded unchanged, and nothing but the unused pooler may be new; anything else fails the export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from uue.data.featurize import hash_metadata
from uue.model.folder import read_tower_config
from uue.model.towers import ItemTower, LowRankResidualProjection
from uue.model.uue_model import load_tower


def metadata_free_projection(tower: ItemTower) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the one affine map pooled text -> pre-normalisation vector, for statements without
    metadata."""
    projection = tower.projection
    with torch.no_grad():
        if isinstance(projection, LowRankResidualProjection) and projection.is_affine:
            weight = torch.eye(projection.up.out_features) + projection.up.weight @ projection.down.weight
            bias = projection.up.bias.clone()
        elif isinstance(projection, nn.Linear):
            weight, bias = projection.weight.clone(), projection.bias.clone()
        else:
            raise TypeError(f"cannot export a projection of type {type(projection).__name__}")
        if tower.metadata is not None:  # pooled + mlp(metadata of none) -> a constant shift
            dim = tower.metadata.mlp[0].in_features
            empty = torch.as_tensor(hash_metadata(None, dim))[None, :]
            shift = tower.metadata.mlp(empty.to(weight.dtype))[0]
            bias = bias + weight @ shift
    return weight.float().contiguous(), bias.float().contiguous()


UNUSED_BY_POOLING = ("pooler.",)
"""Weights of a backbone class that UUE drops (BERT's [CLS] pooler): transformers initialises them on load, and
neither mean nor last-token pooling reads them."""


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers' LOAD REPORT (a warning of `transformers.modeling_utils`) held back while loading; other
    warnings pass, and errors such as a size mismatch still raise. A filter, not a level: transformers reads
    that logger's level to decide other warnings."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)


def check_backbone_weights(model: nn.Module, folder: Path) -> None:
    """Raise ValueError unless `model` holds every weight saved in `folder`, unchanged, and no other weight but
    the unused pooler (what the silenced load report would have flagged, minus the pooler)."""
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(file))
    loaded = model.state_dict()
    problems = [f"{key}: saved but not in the model (unexpected)" for key in saved if key not in loaded]
    problems += [f"{key}: not saved, initialised at random (missing)" for key in loaded
                 if key not in saved and not key.startswith(UNUSED_BY_POOLING)]
    problems += [f"{key}: loaded with other values" for key in saved
                 if key in loaded and not torch.equal(loaded[key].to(saved[key].dtype), saved[key])]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the sentence-transformers model does not hold the item tower's backbone {folder}: "
                         + "; ".join(problems[:5]) + more)


def export_sentence_transformers(model_dir: str | Path, out: str | Path) -> Path:
    """Write the item tower of the UUE model folder `model_dir` as a sentence-transformers folder `out`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    tower_folder = Path(model_dir) / "item_tower"
    meta = json.loads((tower_folder / "tower.json").read_text()) if (tower_folder / "tower.json").is_file() else None
    if meta is None:
        raise FileNotFoundError(f"{tower_folder}/tower.json not found: {model_dir} is not a saved UUE model folder")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new folder for the export")
    tower, _ = load_tower(tower_folder)
    assert isinstance(tower, ItemTower)
    if tower.pretrained_path is not None:
        raise ValueError(f"{model_dir}: the item tower has a pretrained path (a gate on each statement's novelty, "
                         "uue.model.pretrained_path), which sentence-transformers modules cannot express; export a "
                         "model trained with model.pretrained_path_weight=0")
    max_length = read_tower_config(tower_folder).towers.max_statement_length
    pooling = {"mean": "mean", "last_token": "lasttoken"}[meta["pooling"]]
    weight, bias = metadata_free_projection(tower)
    with _without_load_report():
        transformer = Transformer(str(tower_folder / "backbone"), max_seq_length=max_length)
    check_backbone_weights(transformer.auto_model, tower_folder / "backbone")
    modules = [
        transformer,
        Pooling(tower.encoder.hidden_size, pooling_mode=pooling),
        Dense(weight.shape[1], weight.shape[0], bias=True, activation_function=nn.Identity(),
              init_weight=weight, init_bias=bias),
        Normalize(),
    ]
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out
