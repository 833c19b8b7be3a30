"""Typed, validated configuration.

`ExperimentConfig` is what a YAML file under `configs/` holds: the model plus data, training-loop,
distributed and index settings. `ModelConfig` is grouped into sections that follow the packages (towers,
pooling, heads, loss, negatives, caching, packing, optim). The seed API still works: `ModelConfig(batch_size=8,
...)`, `config.batch_size`, and `model.batch_size=8` overrides take a key's own name without its section
(every key name is unique across sections). Unknown keys are rejected with their path, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ------------------------------------------------------------------------------------------- model sections
class TowersConfig(_Strict):
    """The two backbones and what they read (uue.model.backbone, uue.model.towers)."""

    user_model_name: str = "Qwen/Qwen3-Embedding-0.6B"
    item_model_name: str = "Qwen/Qwen3-Embedding-0.6B"
    embedding_dim: int = Field(1024, gt=0)
    max_chunk_length: int = Field(250, gt=2)
    max_statement_length: int = Field(128, gt=2)
    max_context_length: int = Field(64, ge=0)
    num_chunks_per_user: int = Field(100, gt=0)
    freeze_user_backbone: bool = False
    freeze_item_backbone: bool = False
    user_trainable_layers: int | None = Field(None, ge=0)
    """Train only the top N transformer layers of the user backbone (None: all, unless frozen)."""
    item_trainable_layers: int | None = Field(None, ge=0)
    encode_micro_batch: int = Field(32, gt=0)
    """Chunks encoded at once by the user backbone: bounds activation memory per user batch."""
    gradient_checkpointing_chunks: bool = True
    """Recompute chunk activations in backward so training memory does not grow with chunks per user."""


class PoolingConfig(_Strict):
    """How a user's chunk vectors become one vector (uue.model.pooling)."""

    use_attention_pooling: bool = True
    """One learned query attends over the chunk vectors (random value/output projections, then a LayerNorm);
    False: the masked mean."""
    attention_heads: int = Field(8, gt=0)
    chunk_adapter_rank: int = Field(0, ge=0)
    """0: off. r > 0: before pooling, each chunk vector passes through its own residual MLP, x + up(gelu(down(x)))
    with a rank-r bottleneck (`up` zero-initialised, so the untrained tower is unchanged). A mean of chunk vectors
    is linear in them: what one chunk says jointly (this film, loved) cannot be read off the mean when the
    backbone encodes it as a small shift of the film's vector. The adapter lets each chunk's features be
    combined nonlinearly before they are averaged (a Deep Sets encoder on the chunk vectors); it runs on cached
    chunk vectors, so it trains at the cost of a head."""
    chunk_weight_rank: int = Field(0, ge=0)
    """0: off. r > 0: before pooling (and before chunk_adapter), each chunk vector is scaled by 1 + w(chunk), w a
    rank-r GELU MLP to one number, zero-initialised (uue.model.towers.ChunkWeight): the pool learns how much each
    chunk counts, and with what sign (a loved film for, a hated one against), without turning any chunk away from
    what the backbone says it is about, so what it learns applies to statements never trained on."""


class HeadsConfig(_Strict):
    """What sits on the pooled vectors: metadata fusion and the projections (uue.model.towers)."""

    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """In metadata fusion and attention pooling."""
    use_user_metadata: bool = False
    use_item_metadata: bool = False
    metadata_dim: int = Field(64, gt=0)
    item_metadata_dim: int = Field(64, gt=0)
    projection_init: Literal["random", "identity"] = "random"
    """"identity" starts both projections at the identity (needs embedding_dim == the backbones' hidden size):
    with frozen backbones and mean pooling the untrained model then IS the pretrained embedding space, and
    training learns a correction, which keeps what the backbone knows about statements never trained on."""
    projection_rank: int = Field(0, ge=0)
    """0: each projection is a full Linear. r > 0: it is the identity plus a rank-r correction
    (x + up(down(x)), `up` zero-initialised; needs embedding_dim == the backbone hidden size): training
    can move only r directions of the pretrained space, so what the backbone knows about statements
    never trained on (zero-shot) is kept instead of being diluted by directions fitted to seen ones."""
    user_projection_activation: Literal["none", "gelu"] = "none"
    """With projection_rank > 0: "gelu" makes the user tower's correction a residual MLP, x + up(gelu(down(x)))
    (still the identity untrained), so the user side can combine what its pooled history says nonlinearly
    (which films together point to a gender, say) rather than only re-weight directions. The item tower's
    correction stays affine: the statement tower then exports as one Dense layer and stays a linear map of
    the pretrained statement space."""


class LossConfig(_Strict):
    """What a training step optimises (uue.train.objective, uue.train.loss, uue.train.label_loss, uue.train.distill)."""

    temperature: float = Field(0.1, gt=0.01, le=1.0)
    """Initial InfoNCE temperature; the model keeps it as a learnable log-scale, 1 / temperature."""
    learn_temperature: bool = True
    """False: the logit scale stays at 1 / temperature."""
    max_logit_scale: float = Field(100.0, gt=1)
    """The logit scale is clamped to at most this (open_clip's bound of 100)."""
    positives_per_user: int = Field(4, gt=0)
    """A training row is a user: each step trains up to this many of the user's positives (drawn from
    (seed, epoch, user)) against one encoding of the user's history; the user's other positives are never
    negatives (the loss masks them, across workers)."""
    label_loss_weight: float = Field(0.0, ge=0)
    """Weight of a pointwise loss beside InfoNCE (uue.train.label_loss): binary cross-entropy on each batch
    user's own labelled statements, label 1 and label 0 as they occur in the training split, on
    logit_scale * cosine + a learned bias. In-batch softmax only learns which statement fits a user
    *relatively*; this term teaches absolute scores (how often a kind of statement is true), which the
    pooled AUC over users and statement families, and calibration, need."""
    labels_per_user: int = Field(16, gt=0)
    """Labelled statements drawn (uniformly, with replacement) per batch user for the label loss."""
    distill_weight: float = Field(0.0, ge=0)
    """Weight of the learning-without-forgetting term (uue.train.distill): for anchors drawn from the training
    users' history texts, the trained model's scores over a batch's users must correlate with the untrained
    model's (frozen backbones, mean pooling). It keeps what the pretrained space says about which users a text
    fits, for the kinds of statement training has no labels for. Needs both backbones frozen and cached."""
    distill_anchor_source: Literal["history", "bank"] = "history"
    """Where the anchors come from: "history", texts drawn from the training users' history chunks (what users
    write about); "bank", the everyday statements about people in uue/data/anchor_statements.txt (interests,
    habits, traits; no film, film genre, occupation, age or gender)."""
    distill_anchors: int = Field(4096, gt=0)
    """Distinct history chunks drawn (seeded) from the training users as the anchor pool."""
    distill_anchors_per_step: int = Field(64, gt=1)
    """Anchors scored against the batch's users at each step."""


UserPooling = Literal["mean", "affinity"]
"""How the pretrained path's user side pools the frozen chunk vectors (uue.model.pretrained_path)."""


class PretrainedPathConfig(_Strict):
    """The pretrained path fitted after training (uue.model.pretrained_path): for statements far from every
    training statement, the untrained space's ranking of users is added to the trained score."""

    pretrained_path_weight: float = Field(0.0, ge=0)
    """0: off. w > 0: the path's weight, in units of the trained score's spread over training labels. Needs both
    backbones frozen and one backbone name for both towers (the pretrained cosine compares the two spaces)."""
    novelty_threshold: float = Field(0.35, gt=0, lt=2)
    """A statement's novelty is 1 - its highest pretrained cosine to a training statement; the gate is half open
    at this novelty (MovieLens-1M: the held-out sentences of trained genres stay below 0.29, genres no label names
    sit at 0.39-0.43; validation users chose 0.35)."""
    offset_novelty_threshold: float = Field(0.55, gt=0, le=2)
    """Above this novelty a statement's trained offset (its mean score over training users) is dropped: the heads
    map a statement far from every trained one somewhere arbitrary, and its offset with it. MovieLens-1M: trained
    statements' held-out rephrasings reach 0.45 and genres no label names 0.43 (their trained offsets help); whole
    families held out (gender, occupation) sit at 0.59 and above. Chosen on validation users (leave-one-family-out
    and the full model); 2 keeps every offset."""
    novelty_sharpness: float = Field(0.01, gt=0)
    """Width of the gates' sigmoid around the thresholds."""
    novel_trained_share: float = Field(1.0, ge=0, le=1)
    """How much of its trained ranking a statement beyond novelty_threshold keeps (the gate interpolates to 1 near
    the trained statements): the heads rank users on a new kind of statement by the trained ones it lands near.
    1: all of it; 0: the pretrained ranking alone (plus the trained offset below offset_novelty_threshold)."""
    predicted_content_weight: float = Field(0.0, ge=0)
    """p > 0: the path's user side adds p times the centred content its trained vector predicts (a ridge map from
    trained user vectors to pooled frozen chunk vectors, fitted on the training users) to the pooled content: the
    trained model's reading of the user (which films they rated highly), said in the pretrained space where a new
    statement is read. 0: no map (the path as before)."""
    user_fallback_threshold: float | None = Field(None, gt=0, lt=2)
    """A user's novelty is 1 - the cosine between their mean frozen chunk vector and the training users' mean; at
    this novelty the user is half blended to the untrained baseline's score (gate width novelty_sharpness): a history
    unlike every training user's (everyday posts for a model trained on movie ratings) is noise to the trained heads,
    on every statement. MovieLens-1M: training users at most 0.16, ML-100K's 0.13, the sample data's users 0.62-0.93.
    None: no fallback (every user is scored by the trained model and the path)."""
    user_pooling: UserPooling = "mean"
    """How the path's user side pools the frozen chunk vectors: their mean (the untrained baseline's user), or
    "affinity": weighted by how well each chunk, read as a statement by the trained item head, fits the trained
    user (uue.model.pretrained_path.UserPretrainedPath). Needs a linear item head and no item metadata."""


class NegativesConfig(_Strict):
    """Sampled negatives beside the in-batch ones (uue.train.negatives)."""

    negative_sampling: Literal["none", "random", "hard", "semi_hard", "labeled"] = "random"
    """How the num_negative_samples extra columns per user are picked (in-batch negatives always apply);
    "labeled": the user's own label-0 statements of the training split, topped up at random."""
    num_negative_samples: int = Field(15, ge=0)
    semi_hard_margin: float = Field(0.2, gt=0)
    """semi_hard: candidates score within this margin below the user's positive."""
    negative_refresh_steps: int = Field(50, gt=0)
    """Re-encode the statement pool with the current item tower every this many steps (hard/semi-hard)."""


class CachingConfig(_Strict):
    """What frozen backbone parts compute once and reuse (uue.model.cache)."""

    cache_chunk_vectors: bool = False
    """With freeze_user_backbone: encode each distinct chunk once and train the user side (pooling, metadata
    fusion, projection) on the cached chunk vectors; the CPU-friendly path."""
    cache_statement_vectors: bool = False
    """With freeze_item_backbone: encode each statement once and train the item projection on the cache."""
    cache_hidden_states: bool = False
    """Top-N fine-tuning on a cache: for each tower with `*_trainable_layers: N` (and not frozen), the frozen
    lower blocks run once per distinct chunk or statement and their hidden states at the cut are cached, so a
    training step runs only the top N blocks (and the heads). The same model as running the whole backbone
    with its lower blocks frozen, except that those blocks run without dropout. On Ray the user side needs
    distributed.zero_stage <= 2 (the cache runs outside the engine's forward)."""
    hidden_cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage of the cached hidden states (float16 halves memory; float32 is exact)."""
    cache_dir: str | None = None
    """A folder that keeps the cached chunk and statement vectors between runs (one file per backbone
    fingerprint), so runs sharing a frozen backbone encode each text once between them; the environment
    variable UUE_CHUNK_CACHE_DIR overrides it. None: in memory only."""


class PackingConfig(_Strict):
    """How the backbones see a batch: padded or padding-free packs (uue.model.packing)."""

    attention: Literal["padded", "packed"] = "padded"
    """"padded": the Hugging Face forward on (N, L) padded batches with SDPA (the reference). "packed":
    padding-free: each batch is unpadded and its sequences laid end to end in packs of pack_tokens tokens,
    attention confined to each sequence."""
    pack_tokens: int = Field(8192, gt=0)
    """Tokens per pack (a static shape; the packed path's micro-batch, replacing encode_micro_batch)."""
    pack_max_sequences: int | None = Field(None, gt=0)
    """Sequences per pack at most (None: pack_tokens // 8); bounds the per-pack boundary table."""
    pack_min_tokens: int | None = Field(None, gt=0)
    """Narrowest pack: what is left after a batch's full packs goes into packs of pack_tokens / 2, / 4, ...
    down to this width (never narrower than the longest sequence). None: pack_tokens // 32 (6 static shapes);
    pack_tokens: every pack full width."""
    pack_backend: Literal["auto", "varlen", "flex", "sdpa_mask"] = "auto"
    """Packed attention kernel: varlen (torch.nn.attention.varlen, CUDA bf16/fp16), flex (document block mask),
    sdpa_mask (dense block-diagonal mask, any device); auto picks varlen, else flex on CUDA, else sdpa_mask."""
    compile_layers: bool = False
    """Packed path: torch.compile each transformer layer (regional compilation; static pack shapes)."""
    compile_backbone: bool = False
    """Padded path: torch.compile the whole Hugging Face backbone of both towers (what bench/gpu_train.py's
    HF+compile peer runs). The first steps pay the compile (minutes for a 0.6B model), and a batch's new padded
    width may recompile once before the shapes turn dynamic. The packed path compiles its layers instead
    (compile_layers). On Ray, needs distributed.zero_stage <= 2."""
    checkpoint_granularity: Literal["chunks", "layers"] = "chunks"
    """Packed user tower with gradient_checkpointing_chunks: recompute whole packs ("chunks": least memory,
    one extra forward) or each layer's inside ("layers": keeps layer inputs, frees attention/MLP activations)."""


class OptimConfig(_Strict):
    """Batch, epochs and the optimizer (uue.train.step)."""

    batch_size: int = Field(32, gt=0)
    """Users per step and worker."""
    num_epochs: int = Field(10, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    user_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of the user backbone (None: learning_rate)."""
    item_learning_rate: float | None = Field(None, gt=0)
    head_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of pooling, metadata fusion, projections and temperature (None: 10x learning_rate)."""
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Linear warmup over this share of the steps, then cosine decay to 0."""
    max_grad_norm: float | None = Field(1.0, gt=0)

    @property
    def effective_head_learning_rate(self) -> float:
        return self.head_learning_rate if self.head_learning_rate is not None else 10 * self.learning_rate


SECTIONS: dict[str, type[_Strict]] = {
    "towers": TowersConfig, "pooling": PoolingConfig, "heads": HeadsConfig, "loss": LossConfig,
    "negatives": NegativesConfig, "pretrained_path": PretrainedPathConfig, "caching": CachingConfig,
    "packing": PackingConfig, "optim": OptimConfig,
}
SECTION_OF: dict[str, str] = {key: section for section, cls in SECTIONS.items() for key in cls.model_fields}
"""Each key's section: key names are unique across sections, so the seed's flat names stay unambiguous."""
SAVED_WITH_A_MODEL: dict[str, Any] = {"towers": True, "pooling": True, "heads": True, "packing": True,
                                      "loss": {"max_logit_scale"}}
"""What a saved model records (uue.json, tower.json): what building and using its towers needs, nothing of how
it was trained (the `model_dump(include=...)` spec)."""


def _nest_flat_keys(data: dict[str, Any], where: str = "model") -> dict[str, Any]:
    """{batch_size: 8, heads: {...}} -> {optim: {batch_size: 8}, heads: {...}}; a key given both ways is an error."""
    out = {key: dict(value) if key in SECTIONS and isinstance(value, dict) else value for key, value in data.items()}
    for key in [k for k in data if k in SECTION_OF]:
        section = out.setdefault(SECTION_OF[key], {})
        if not isinstance(section, dict):
            break  # the section's own error says what is wrong
        if key in section:
            raise ValueError(f"{where}.{key} is given both as {key} and as {SECTION_OF[key]}.{key}")
        section[key] = out.pop(key)
    return out


class ModelConfig(_Strict):
    """The two towers, the loss and the optimisation hyper-parameters, in sections."""

    towers: TowersConfig = Field(default_factory=TowersConfig)
    pooling: PoolingConfig = Field(default_factory=PoolingConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    pretrained_path: PretrainedPathConfig = Field(default_factory=PretrainedPathConfig)
    caching: CachingConfig = Field(default_factory=CachingConfig)
    packing: PackingConfig = Field(default_factory=PackingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @model_validator(mode="before")
    @classmethod
    def _accept_flat_keys(cls, data: Any) -> Any:
        return _nest_flat_keys(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
        towers, caching, heads = self.towers, self.caching, self.heads
        if heads.user_projection_activation != "none" and not heads.projection_rank:
            raise ValueError("user_projection_activation needs projection_rank >= 1 (it acts inside the correction)")
        if caching.cache_chunk_vectors and not towers.freeze_user_backbone:
            raise ValueError("cache_chunk_vectors needs freeze_user_backbone: true (a trained backbone changes them)")
        if caching.cache_statement_vectors and not towers.freeze_item_backbone:
            raise ValueError("cache_statement_vectors needs freeze_item_backbone: true")
        distill = self.loss.distill_weight > 0
        if distill and not (caching.cache_chunk_vectors and caching.cache_statement_vectors):
            raise ValueError("distill_weight needs cache_chunk_vectors and cache_statement_vectors (frozen, cached "
                             "backbones: the untrained model's vectors are then the caches themselves)")
        if distill and self.pooling.use_attention_pooling:
            raise ValueError("distill_weight needs mean pooling (use_attention_pooling: false): the teacher is the "
                             "pool of the frozen chunk vectors, which attention pooling's projections leave")
        if self.pretrained_path.pretrained_path_weight > 0:
            if not (towers.freeze_user_backbone and towers.freeze_item_backbone):
                raise ValueError("pretrained_path_weight needs freeze_user_backbone and freeze_item_backbone: the path "
                                 "reads the pretrained spaces")
            if self.pooling.use_attention_pooling:
                raise ValueError("pretrained_path_weight needs mean pooling (use_attention_pooling: false): the path's "
                                 "user side is the pool of the frozen chunk vectors, the untrained baseline's")
            if towers.user_model_name != towers.item_model_name:
                raise ValueError("pretrained_path_weight needs one backbone for both towers (user_model_name == "
                                 "item_model_name): the path compares a user's chunk vectors with a statement's")
            if self.pretrained_path.user_pooling == "affinity" and self.heads.use_item_metadata:
                raise ValueError("user_pooling 'affinity' reads history chunks with the item head, and chunks have no "
                                 "item metadata: turn use_item_metadata off or use user_pooling 'mean'")
        if self.packing.compile_backbone and self.packing.attention == "packed":
            raise ValueError("compile_backbone compiles the padded Hugging Face forward; the packed path compiles "
                             "its layers (compile_layers: true)")
        if self.packing.attention == "packed":
            longest = max(towers.max_chunk_length, towers.max_statement_length + towers.max_context_length)
            if self.packing.pack_tokens < longest:
                raise ValueError(f"pack_tokens={self.packing.pack_tokens} must hold the longest sequence ({longest} "
                                 "tokens: max_chunk_length, or max_statement_length + max_context_length)")
            min_tokens = self.packing.pack_min_tokens
            if min_tokens is not None and min_tokens > self.packing.pack_tokens:
                raise ValueError(f"pack_min_tokens={min_tokens} is wider than pack_tokens={self.packing.pack_tokens}")
        if caching.cache_hidden_states and not (self.hidden_cache_layers("user") or self.hidden_cache_layers("item")):
            raise ValueError("cache_hidden_states needs user_trainable_layers or item_trainable_layers >= 1 on a "
                             "tower whose backbone is not frozen")
        return self

    def hidden_cache_layers(self, tower: Literal["user", "item"]) -> int | None:
        """N when `tower` trains its top N blocks on cached hidden states (cache_hidden_states), else None."""
        towers = self.towers
        frozen = towers.freeze_user_backbone if tower == "user" else towers.freeze_item_backbone
        layers = towers.user_trainable_layers if tower == "user" else towers.item_trainable_layers
        return layers if self.caching.cache_hidden_states and not frozen and layers else None

    # -- the seed API: a key by its own name, wherever its section is ------------------------------------
    def __getattr__(self, name: str) -> Any:
        section = SECTION_OF.get(name)
        if section is None:
            return super().__getattr__(name)  # type: ignore[misc]
        return getattr(getattr(self, section), name)

    def __setattr__(self, name: str, value: Any) -> None:
        section = SECTION_OF.get(name)
        if section is None:
            super().__setattr__(name, value)
        else:
            setattr(getattr(self, section), name, value)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> ModelConfig:
        """A copy with `update` applied and validated; `update` may name keys by section or by their own name."""
        if not update:
            return super().model_copy(deep=deep)
        data = self.model_dump()
        for section, values in _nest_flat_keys(dict(update)).items():
            if section in SECTIONS and isinstance(values, dict):
                data[section] = {**data[section], **values}
            else:
                data[section] = values
        return type(self).model_validate(data)

    # -- what a saved model records ----------------------------------------------------------------------
    def saved(self) -> dict[str, Any]:
        """The sections a saved model needs to be rebuilt and used (SAVED_WITH_A_MODEL)."""
        return self.model_dump(include=SAVED_WITH_A_MODEL)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> ModelConfig:
        """The config recorded in a saved model or preprocessed folder: sectioned (this version) or the flat
        dump of every key that earlier versions wrote (two of its keys are gone: see below)."""
        data = dict(data)
        data.pop("freeze_item_projection", None)  # it only kept a projection out of training
        pooling_kind = data.pop("attention_pooling_kind", "multihead")
        if pooling_kind != "multihead" and data.get("use_attention_pooling", True):
            raise ValueError(f"the saved model pools with attention_pooling_kind={pooling_kind!r}, which this "
                             "version no longer builds (measured no better than multihead attention or the mean)")
        return cls.model_validate(data)


class DataConfig(_Strict):
    """Where the training data lives and how it is streamed."""

    path: str = "uue/data/sample_data"
    """A preprocessed folder (ray_jobs.preprocess output, with manifest.json) or a data-contract folder, which
    training preprocesses first (into preprocessed_dir)."""
    train_split: str = "train"
    validation_split: str = "validation"
    shuffle_seed: int = 0
    shuffle_buffer_users: int = Field(1024, gt=0)
    """Users held in each worker's streaming shuffle buffer (seeded by shuffle_seed and epoch): bounds memory."""
    preprocessed_dir: str | None = None
    """Where a data-contract `path` is preprocessed to (None: training.output_dir/preprocessed)."""


class TrainingConfig(_Strict):
    """The training loop around `train_step`."""

    output_dir: str = "runs/default"
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (None: num_epochs over the training pairs)."""
    checkpoint_every_steps: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every_steps: int = Field(10, gt=0)
    peak_tflops: float | None = Field(None, gt=0)
    """One device's peak TFLOP/s for the logged MFU/HFU (None: 989, H100/H200 bf16 dense, on CUDA; none on CPU)."""
    seed: int = 0
    progress_bar: bool = True
    profile_steps: tuple[int, int] | None = None
    """[first, last]: a torch.profiler trace of steps first..last on every process (one file per rank,
    output_dir/profile/rank{R}.steps{first}-{last}.pt.trace.json, for Perfetto or TensorBoard). None: no trace
    (every step still logs its per-phase times, time/*)."""
    tensorboard: bool = True
    """Write the logged metrics as TensorBoard event files under output_dir/tensorboard (rank 0 only)."""
    mlflow_tracking_uri: str | None = None
    """Also log the metrics (and the config as parameters) to MLflow at this tracking URI (rank 0 only); None:
    the MLFLOW_TRACKING_URI environment variable when it is set, else no MLflow. Needs `pip install mlflow`."""
    mlflow_experiment: str = "uue"
    """The MLflow experiment the run is logged under (created when missing)."""

    @field_validator("profile_steps")
    @classmethod
    def _check_profile_steps(cls, steps: tuple[int, int] | None) -> tuple[int, int] | None:
        if steps is not None and not 1 <= steps[0] <= steps[1]:
            raise ValueError(f"profile_steps must be [first, last] with 1 <= first <= last, got {list(steps)}")
        return steps


class DistributedConfig(_Strict):
    """Ray Train / DeepSpeed settings (used by ray_jobs.train)."""

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    zero_stage: int = Field(0, ge=0, le=3)
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON/YAML; keys set here (zero_stage, batch sizes, lr) override it."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints (shared storage or a URI on a multi-node cluster);
    None: output_dir/ray_train."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts after a failure, each resuming from the last checkpoint (-1: unlimited)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    featurize_cpus: float = Field(1.0, gt=0)
    """CPUs per Ray Data task that reads the users shards for the workers."""


class IndexConfig(_Strict):
    """Batch indexing of statements (ray_jobs.index_items): the item tower's actor pool and the ANN index."""

    min_actors: int = Field(1, gt=0)
    """The Ray Data actor pool autoscales between min_actors and max_actors item-tower replicas."""
    max_actors: int = Field(2, gt=0)
    batch_size: int = Field(64, gt=0)
    """Statements per map_batches call (one forward pass of the item tower)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Item tower precision in the actors (auto: bfloat16 on GPU, float32 on CPU); vectors are stored as f32."""
    gpus_per_actor: float = Field(0, ge=0)
    """GPUs each actor reserves (0: the actors encode on CPU)."""
    cpus_per_actor: float = Field(1, gt=0)
    """CPUs each actor reserves; on CPU also its torch threads."""
    rows_per_shard: int = Field(50_000, gt=0)
    """Vectors per Parquet shard of the index folder."""
    id_column: str = "statement_id"
    text_column: str = "text"
    connectivity: int = Field(16, gt=1)
    """HNSW graph degree of the usearch index (recall vs. memory)."""
    expansion_search: int = Field(64, gt=0)
    """HNSW candidate list size at query time (recall vs. latency)."""
    attention: Literal["model", "padded", "packed"] = "model"
    """How the actors encode: "model" keeps the item tower's saved model.attention (padded unless trained
    packed); "packed": Ray Data tokenizes in CPU tasks beside the actors (overlapped with encoding) and the
    actors encode the ragged ids padding-free; "padded": the actors tokenize, pad and run the HF forward."""
    compile_layers: bool | None = None
    """Packed actors: torch.compile each transformer layer (regional compilation); None keeps model.compile_layers."""
    pack_tokens: int | None = Field(None, gt=0)
    """Packed actors: tokens per pack (None keeps model.pack_tokens); batch_size statements fill one or more."""

    @model_validator(mode="after")
    def _check_pool(self) -> IndexConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self


class ExperimentConfig(_Strict):
    """One YAML file under configs/: everything a training run needs."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    index: IndexConfig = IndexConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_not_none(cls, value: Any) -> Any:
        return {} if value is None else value


def _parse_value(raw: str) -> Any:
    """`key=value` values are YAML scalars: 3 -> int, 1e-4 -> float, true -> bool, null -> None."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML reads 1e-4 as a string; numbers written that way are common in learning rates.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (e.g. `model.optim.batch_size=8`) to a nested dict. A model key may
    leave out its section (`model.batch_size=8`, the seed's names): it lands in its section, so it overrides
    what a YAML file sets there."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.optim.batch_size=8)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if len(keys) == 2 and keys[0] == "model" and keys[1] in SECTION_OF:
            keys.insert(1, SECTION_OF[keys[1]])
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = _parse_value(raw)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config, apply `key=value` overrides and validate the result."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    try:
        if isinstance(data.get("model"), dict):  # a file written with the seed's flat names
            data["model"] = _nest_flat_keys(data["model"])
        data = apply_overrides(data, list(overrides or []))
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    except ValueError as err:  # a key given both flat and in its section
        raise ConfigError(f"invalid config {source}: {err}") from None
