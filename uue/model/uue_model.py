"""The two-tower UUE model: towers, a learnable temperature, and the on-disk format.

On disk a model is a folder:
    uue.json                  format version and the ModelConfig
    logit_scale.safetensors   the learned temperature (log scale) and the label-loss bias
    user_tower/, item_tower/  one folder per tower:
        tower.json            which tower, the ModelConfig, the backbone's pooling
        backbone/             a plain Hugging Face model + tokenizer (AutoModel/AutoTokenizer.from_pretrained)
        head.safetensors      pooling, metadata fusion and projection weights
Each tower folder loads on its own (`UserTower`/`ItemTower` via `load_tower`), without Ray, DeepSpeed or
the trainer.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from uue.config import ModelConfig
from uue.model.backbone import TextEncoder, freeze_backbone, load_backbone
from uue.model.towers import ItemTower, UserTower

if TYPE_CHECKING:
    from uue.distill import AnchorSampler
    from uue.label_loss import UserLabelSampler
    from uue.negatives import NegativeSampler

FORMAT_VERSION = 1


@dataclass
class UUEOutput:
    """What one forward pass returns; the loss reads it."""

    user: torch.Tensor  # (B, D) unit vectors
    item: torch.Tensor  # (M, D) unit vectors of the batch's positive slots (M = B x positives per user)
    logit_scale: torch.Tensor  # (1,) exp of the clamped log-scale
    negatives: torch.Tensor | None = None  # (B, K, D) sampled negative statements per user
    negative_ids: torch.Tensor | None = None  # (B, K) their statement indices
    label_items: torch.Tensor | None = None  # (B, K, D) statements drawn from each user's labels (label loss)
    label_values: torch.Tensor | None = None  # (B, K) their 0/1 labels
    label_mask: torch.Tensor | None = None  # (B, K) which draws are real
    label_bias: torch.Tensor | None = None  # (1,) the label loss's learned bias
    anchors: torch.Tensor | None = None  # (K, D) distillation anchors through the item tower (uue.distill)
    teacher_anchors: torch.Tensor | None = None  # (K, H) the untrained model's unit vectors of those anchors
    teacher_users: torch.Tensor | None = None  # (B, H) the users' pooled content, no gradient (UserTower.content)


class UUEModel(nn.Module):
    """User tower + item tower (separate weights) + temperature owned by the model (as in open_clip)."""

    def __init__(
        self,
        config: ModelConfig,
        user_tower: UserTower,
        item_tower: ItemTower,
        user_tokenizer: PreTrainedTokenizerBase,
        item_tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.config = config
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.user_tokenizer = user_tokenizer
        self.item_tokenizer = item_tokenizer
        # 1-D, not 0-dim: DeepSpeed cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / config.temperature)), requires_grad=config.learn_temperature
        )
        # The label loss's logit offset (uue.label_loss); only trained when that loss is on.
        self.label_bias = nn.Parameter(torch.zeros(1), requires_grad=config.label_loss_weight > 0)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> UUEModel:
        """Build from backbone names/presets (pretrained weights where the name has them)."""
        user_backbone, user_tok = load_backbone(config.user_model_name, seed=seed)
        item_backbone, item_tok = load_backbone(config.item_model_name, seed=seed + 1)
        freeze_backbone(user_backbone, config.freeze_user_backbone, config.user_trainable_layers)
        freeze_backbone(item_backbone, config.freeze_item_backbone, config.item_trainable_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)  # heads identical on every worker
            user_tower = UserTower(TextEncoder(user_backbone), config)
            item_tower = ItemTower(TextEncoder(item_backbone), config)
        item_tower.projection.requires_grad_(not config.freeze_item_projection)
        return cls(config, user_tower, item_tower, user_tok, item_tok)

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """After an optimizer step, keep the parameter itself inside its bound (gradient dies at the clamp).

        Under DeepSpeed the optimizer steps its own fp32 master copy (and ZeRO-3 leaves this rank an empty
        placeholder), so the stored value may sit above the bound there; `clamped_logit_scale`, which every
        forward uses, bounds the value the loss sees either way.
        """
        self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_users(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.user_tower(
            chunk_mask=batch["chunk_mask"],
            input_ids=batch.get("user_input_ids"),
            attention_mask=batch.get("user_attention_mask"),
            metadata=batch.get("user_metadata"),
            chunk_vectors=batch.get("chunk_vectors"),
            chunk_hidden=batch.get("chunk_hidden"),
        )

    def encode_statements(self, batch: dict[str, torch.Tensor], prefix: str = "item") -> torch.Tensor:
        return self.item_tower(
            batch.get(f"{prefix}_input_ids"), batch.get(f"{prefix}_attention_mask"), batch.get(f"{prefix}_metadata"),
            text_vectors=batch.get(f"{prefix}_text_vectors"), hidden=batch.get(f"{prefix}_hidden"),
        )

    def _encode_item_parts(self, parts: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Flat item features of several statement sets -> their vectors, in one item-tower call when the sets
        carry the same kinds of features (token columns padded to the widest on the tokenizer's side)."""
        keys = {name for name, value in parts[0].items() if value is not None}
        if len(parts) > 1 and ("hidden" in keys or any(
                {n for n, v in part.items() if v is not None} != keys for part in parts[1:])):
            return [self._encode_item_parts([part])[0] for part in parts]
        if "input_ids" in keys and len(parts) > 1:
            width = max(part["input_ids"].size(-1) for part in parts)
            left = getattr(self.item_tokenizer, "padding_side", "right") == "left"
            pad_id = getattr(self.item_tokenizer, "pad_token_id", None) or 0
            parts = [{**part, "input_ids": _pad_columns(part["input_ids"], width, pad_id, left),
                      "attention_mask": _pad_columns(part["attention_mask"], width, 0, left)} for part in parts]
        flat = {name: torch.cat([part[name] for part in parts]) for name in keys}
        vectors = self.item_tower(flat.get("input_ids"), flat.get("attention_mask"), flat.get("metadata"),
                                  text_vectors=flat.get("text_vectors"), hidden=flat.get("hidden"))
        return list(vectors.split([next(iter(part.values())).size(0) for part in parts]))

    def forward(
        self, batch: dict[str, torch.Tensor], negative_sampler: NegativeSampler | None = None, task: str = "train",
        label_sampler: UserLabelSampler | None = None, anchor_sampler: AnchorSampler | None = None,
    ) -> UUEOutput | torch.Tensor:
        """Everything the loss needs, computed inside one forward (ZeRO-3 gathers parameters only here).

        `task="users"` / `task="items"` only encode users / statements: a DeepSpeed engine must run every
        use of the weights through its forward, encoding included.
        """
        if task == "users":
            return self.encode_users(batch)
        if task == "items":
            return self.encode_statements(batch)
        # Tokens the item tower runs on beyond the batch's own statements (negatives, label draws): the training
        # loop's tokens/s and MFU count them; a device tensor, read with the step's other metrics.
        self.extra_item_tokens: torch.Tensor | int = 0
        users = self.encode_users(batch)
        # Negatives are chosen from the user vectors and the refreshed pool, label statements drawn from the
        # batch: then the item tower runs once, on positives, negatives and label statements together.
        sets: list[tuple[str, dict[str, torch.Tensor]]] = []
        negative_ids = draw = None
        if negative_sampler is not None and negative_sampler.num_negatives > 0:
            negative_ids, negative_features = negative_sampler.sample(users.detach(), batch)
            sets.append(("negatives", negative_features))
        if label_sampler is not None:
            draw = label_sampler.sample(batch, users.device)
            sets.append(("labels", draw.features))
        teacher_anchors = None
        if anchor_sampler is not None:
            anchor_features, teacher_anchors = anchor_sampler.sample(users.device)
            sets.append(("anchors", {name: value.unsqueeze(0) for name, value in anchor_features.items()}))
        positives = {name.removeprefix("item_"): value for name, value in batch.items() if name in (
            "item_input_ids", "item_attention_mask", "item_metadata", "item_text_vectors", "item_hidden")}
        shapes = [next(iter(features.values())).shape[:2] for _, features in sets]
        for _, features in sets:  # the batch's own statements are counted from the host batch (train_step)
            if "attention_mask" in features and "hidden" not in features:  # hidden states count none (backbone_tokens)
                self.extra_item_tokens = self.extra_item_tokens + features["attention_mask"].sum()
        vectors = self._encode_item_parts([positives] + [
            {name: value.flatten(0, 1) for name, value in features.items()} for _, features in sets])
        encoded = {name: v.view(b, k, -1) for (name, _), (b, k), v in zip(sets, shapes, vectors[1:], strict=True)}
        out = UUEOutput(users, vectors[0], self.clamped_logit_scale(), encoded.get("negatives"), negative_ids)
        if draw is not None:
            out.label_items = encoded["labels"]
            out.label_values, out.label_mask, out.label_bias = draw.values, draw.mask, self.label_bias
        if teacher_anchors is not None:
            out.anchors, out.teacher_anchors = encoded["anchors"].squeeze(0), teacher_anchors
            with torch.no_grad():
                out.teacher_users = self.user_tower.content(batch["chunk_vectors"], batch["chunk_mask"])
        return out

    # ------------------------------------------------------------------ on-disk format
    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder. `state_dict` (full, gathered) may come from a sharded engine."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        (folder / "uue.json").write_text(
            json.dumps({"format": "uue-model", "version": FORMAT_VERSION, "model_config": self.config.model_dump()},
                       indent=2)
        )
        scalars = {"logit_scale": state["logit_scale"]}
        if "label_bias" in state:
            scalars["label_bias"] = state["label_bias"]
        save_file(scalars, str(folder / "logit_scale.safetensors"))
        for name, tower, tokenizer in (
            ("user", self.user_tower, self.user_tokenizer),
            ("item", self.item_tower, self.item_tokenizer),
        ):
            prefix = f"{name}_tower."
            tower_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            _save_tower(folder / f"{name}_tower", name, tower, tokenizer, tower_state, self.config)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> UUEModel:
        folder = Path(folder)
        meta = _read_json(folder / "uue.json", "uue-model")
        config = ModelConfig.model_validate(meta["model_config"])
        user_tower, user_tok = load_tower(folder / "user_tower", map_location)
        item_tower, item_tok = load_tower(folder / "item_tower", map_location)
        model = cls(config, user_tower, item_tower, user_tok, item_tok)  # type: ignore[arg-type]
        scalars = load_file(str(folder / "logit_scale.safetensors"))
        with torch.no_grad():
            model.logit_scale.copy_(scalars["logit_scale"])
            if "label_bias" in scalars:  # folders written before the label loss existed have none
                model.label_bias.copy_(scalars["label_bias"])
        freeze_backbone(model.user_tower.encoder.backbone, config.freeze_user_backbone, config.user_trainable_layers)
        freeze_backbone(model.item_tower.encoder.backbone, config.freeze_item_backbone, config.item_trainable_layers)
        model.item_tower.projection.requires_grad_(not config.freeze_item_projection)
        return model.to(map_location)


def _read_json(path: Path, expected_format: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a saved UUE {expected_format} folder")
    meta = json.loads(path.read_text())
    if meta.get("format") != expected_format or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: expected format {expected_format!r} version <= {FORMAT_VERSION}, got {meta}")
    return meta


def _save_tower(
    folder: Path, name: str, tower: nn.Module, tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor], config: ModelConfig,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    backbone_prefix = "encoder.backbone."
    backbone_state = {k[len(backbone_prefix):]: v for k, v in state.items() if k.startswith(backbone_prefix)}
    head_state = {k: v for k, v in state.items() if not k.startswith(backbone_prefix)}
    backbone = tower.encoder.backbone  # type: ignore[union-attr]
    with _quiet_transformers():
        backbone.save_pretrained(folder / "backbone", state_dict=backbone_state, safe_serialization=True)
    tokenizer.save_pretrained(folder / "backbone")
    save_file(head_state, str(folder / "head.safetensors"))
    (folder / "tower.json").write_text(json.dumps({
        "format": "uue-tower", "version": FORMAT_VERSION, "tower": name,
        "pooling": tower.encoder.pooling, "model_config": config.model_dump(),  # type: ignore[union-attr]
    }, indent=2))


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-file progress bars and expected-weights notes while (un)packing towers."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_tower(
    folder: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[UserTower | ItemTower, PreTrainedTokenizerBase]:
    """Load one tower folder on its own: (tower in eval mode, its tokenizer)."""
    folder = Path(folder)
    meta = _read_json(folder / "tower.json", "uue-tower")
    config = ModelConfig.model_validate(meta["model_config"])
    with _quiet_transformers():
        backbone = AutoModel.from_pretrained(folder / "backbone")
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(folder / "backbone")
    encoder = TextEncoder(backbone)
    encoder.pooling = meta["pooling"]
    tower: UserTower | ItemTower = (UserTower if meta["tower"] == "user" else ItemTower)(encoder, config)
    head = load_file(str(folder / "head.safetensors"))
    missing, unexpected = tower.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.backbone.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: head weights do not match the tower (missing {missing}, unexpected {unexpected})")
    return tower.to(map_location).eval(), tokenizer


def _pad_columns(values: torch.Tensor, width: int, fill: int, left: bool) -> torch.Tensor:
    """(N, L) -> (N, width), the new columns on the padding side."""
    extra = width - values.size(-1)
    if extra <= 0:
        return values
    pad = values.new_full((values.size(0), extra), fill)
    return torch.cat([pad, values] if left else [values, pad], dim=-1)
