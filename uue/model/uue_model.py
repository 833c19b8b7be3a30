"""The two-tower UUE model: towers, a learnable temperature, and the on-disk format.

On disk a model is a folder:
    uue.json                  format version and what using the model needs of its ModelConfig (.saved())
    logit_scale.safetensors   the learned temperature (log scale) and the label-loss bias
    user_tower/, item_tower/  one folder per tower:
        tower.json            which tower, the same config, the backbone's pooling
        backbone/             a plain Hugging Face model + tokenizer (AutoModel/AutoTokenizer.from_pretrained)
        head.safetensors      pooling, metadata fusion and projection weights
Each tower folder loads on its own (`UserTower`/`ItemTower` via `load_tower`), without Ray, DeepSpeed or
the trainer.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from uue.config import ModelConfig
from uue.model.backbone import TextEncoder, freeze_backbone, load_backbone
from uue.model.folder import FORMAT_VERSION, read_meta
from uue.model.inputs import StatementBatch, UserBatch
from uue.model.pretrained_path import PREFIX as PATH_PREFIX
from uue.model.pretrained_path import StatementPretrainedPath, UserPretrainedPath, has_pretrained_path
from uue.model.towers import ItemTower, UserTower


class UUEModel(nn.Module):
    """User tower + item tower (separate weights) + temperature owned by the model (as in open_clip).

    It only encodes: what a training step computes from the vectors (sampled negatives, InfoNCE, the label
    loss) is uue.train.objective's, which wraps this model.
    """

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
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.loss.temperature)))
        # The label loss's logit offset (uue.train.label_loss): trained only when the objective uses that loss.
        self.label_bias = nn.Parameter(torch.zeros(1), requires_grad=False)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> UUEModel:
        """Build from backbone names/presets (pretrained weights where the name has them)."""
        towers = config.towers
        user_backbone, user_tok = load_backbone(towers.user_model_name, seed=seed)
        item_backbone, item_tok = load_backbone(towers.item_model_name, seed=seed + 1)
        freeze_backbone(user_backbone, towers.freeze_user_backbone, towers.user_trainable_layers)
        freeze_backbone(item_backbone, towers.freeze_item_backbone, towers.item_trainable_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)  # heads identical on every worker
            user_tower = UserTower(TextEncoder(user_backbone), config)
            item_tower = ItemTower(TextEncoder(item_backbone), config)
        return cls(config, user_tower, item_tower, user_tok, item_tok)

    def encode_users(self, users: UserBatch) -> torch.Tensor:
        """(B, output_dim) user vectors (unit unless a pretrained path is fitted)."""
        return self.user_tower(users.chunks, users.chunk_mask, users.metadata)

    def encode_statements(self, statements: StatementBatch) -> torch.Tensor:
        """(N, output_dim) unit statement vectors."""
        return self.item_tower(statements.text, statements.metadata)

    def clamped_logit_scale(self) -> torch.Tensor:
        """The scale scores are read with: exp of the log-scale, bounded by loss.max_logit_scale."""
        return self.logit_scale.clamp(max=math.log(self.config.loss.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """After an optimizer step, keep the parameter itself inside its bound (gradient dies at the clamp).

        Under DeepSpeed the optimizer steps its own fp32 master copy (and ZeRO-3 leaves this rank an empty
        placeholder), so the stored value may sit above the bound there; `clamped_logit_scale`, which every
        training forward uses, bounds the value the loss sees either way.
        """
        self.logit_scale.clamp_(max=math.log(self.config.loss.max_logit_scale))

    # ------------------------------------------------------------------ on-disk format
    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder. `state_dict` (full, gathered) may come from a sharded engine."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        (folder / "uue.json").write_text(
            json.dumps({"format": "uue-model", "version": FORMAT_VERSION, "model_config": self.config.saved()},
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
        config = ModelConfig.from_saved(read_meta(folder / "uue.json", "uue-model")["model_config"])
        user_tower, user_tok = load_tower(folder / "user_tower", map_location)
        item_tower, item_tok = load_tower(folder / "item_tower", map_location)
        model = cls(config, user_tower, item_tower, user_tok, item_tok)  # type: ignore[arg-type]
        scalars = load_file(str(folder / "logit_scale.safetensors"))
        with torch.no_grad():
            model.logit_scale.copy_(scalars["logit_scale"])
            if "label_bias" in scalars:  # folders written before the label loss existed have none
                model.label_bias.copy_(scalars["label_bias"])
        towers = config.towers
        freeze_backbone(model.user_tower.encoder.backbone, towers.freeze_user_backbone, towers.user_trainable_layers)
        freeze_backbone(model.item_tower.encoder.backbone, towers.freeze_item_backbone, towers.item_trainable_layers)
        return model.to(map_location)


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
        "pooling": tower.encoder.pooling, "model_config": config.saved(),  # type: ignore[union-attr]
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
    meta = read_meta(folder / "tower.json", "uue-tower")
    config = ModelConfig.from_saved(meta["model_config"])
    with _quiet_transformers():
        backbone = AutoModel.from_pretrained(folder / "backbone")
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(folder / "backbone")
    encoder = TextEncoder(backbone)
    encoder.pooling = meta["pooling"]
    tower: UserTower | ItemTower = (UserTower if meta["tower"] == "user" else ItemTower)(encoder, config)
    head = load_file(str(folder / "head.safetensors"))
    if has_pretrained_path(head):
        path_class = UserPretrainedPath if meta["tower"] == "user" else StatementPretrainedPath
        tower.pretrained_path = path_class.from_state(head)
        # A buffer newer than the saved path (from_state gave it its default) is not missing.
        defaults = tower.pretrained_path.state_dict()
        head |= {PATH_PREFIX + k: v for k, v in defaults.items() if PATH_PREFIX + k not in head}
    missing, unexpected = tower.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.backbone.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: head weights do not match the tower (missing {missing}, unexpected {unexpected})")
    return tower.to(map_location).eval(), tokenizer
