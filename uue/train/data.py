"""What a training process reads: the preprocessed shards (made first from a raw folder), the statement
table, the batch collator and the samplers, built the same way in one process and in a Ray worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uue.config import ExperimentConfig
from uue.data.featurize import Featurizer
from uue.data.readers import UUEDataset, load_dataset
from uue.data.shards import Shards, check_manifest, is_preprocessed, preprocess_local
from uue.distill import AnchorSampler, bank_anchor_texts, history_anchor_texts
from uue.model.uue_model import UUEModel
from uue.train.samplers import Samplers, build_samplers, wants_samplers
from uue.train.stream import BatchCollator, StatementTable


def preprocessed_target(config: ExperimentConfig) -> str:
    return config.data.preprocessed_dir or str(Path(config.training.output_dir) / "preprocessed")


def open_shards(config: ExperimentConfig, featurizer: Featurizer, uri: str | None = None) -> Shards:
    """Open a preprocessed folder and refuse it when it was made for another tokenizer, lengths or split."""
    shards = Shards.open(uri or config.data.path)
    check_manifest(shards.manifest, featurizer, config.data.train_split, shards.uri)
    return shards


def local_shards(config: ExperimentConfig, featurizer: Featurizer,
                 dataset: UUEDataset | None = None) -> tuple[Shards, UUEDataset | None]:
    """data.path as shards: a preprocessed folder as it is; a data-contract folder (or an in-memory dataset)
    preprocessed in this process first, into data.preprocessed_dir. Returns the raw dataset when there is one."""
    if dataset is None and is_preprocessed(config.data.path):
        return open_shards(config, featurizer), None
    dataset = dataset if dataset is not None else load_dataset(config.data.path)
    target = preprocessed_target(config)
    preprocess_local(dataset, target, config, featurizer, config.data.train_split)
    return open_shards(config, featurizer, target), dataset


@dataclass
class Inputs:
    statements: StatementTable
    collate: BatchCollator
    samplers: Samplers


def build_inputs(config: ExperimentConfig, shards: Shards, model: UUEModel, featurizer: Featurizer,
                 device: torch.device, sampler_seed: int) -> Inputs:
    """Statement table (a frozen item backbone's vectors with cache_statement_vectors, or the hidden states at
    the item tower's cut with cache_hidden_states), the collator (a frozen user backbone's chunk-vector cache
    with cache_chunk_vectors, or a cache of chunk hidden states at the user tower's cut) and the samplers of
    one process. The caches run the frozen part once per process, outside any engine's forward."""
    cfg = config.model
    hidden_dtype = getattr(torch, cfg.hidden_cache_dtype)
    table = StatementTable(shards.statements(), featurizer)
    if cfg.cache_statement_vectors:
        from uue.chunk_cache import statement_vector_features

        vectors = statement_vector_features(model.item_tower.encoder, table.pool_features(), device=device)
        table.text_vectors = vectors["item_text_vectors"]
    elif model.item_tower.hidden_cut is not None:
        from uue.chunk_cache import statement_hidden_features

        hidden = statement_hidden_features(model.item_tower.encoder, table.pool_features(),
                                           model.item_tower.hidden_cut, device=device, dtype=hidden_dtype)
        table.hidden, table.hidden_mask = hidden["item_hidden"], hidden["item_attention_mask"]
    chunk_vectors: Any = None
    chunk_hidden: Any = None
    if cfg.cache_chunk_vectors:
        from uue.chunk_cache import TokenChunkCache

        chunk_vectors = TokenChunkCache(model.user_tower.encoder, featurizer, device)
    elif model.user_tower.hidden_cut is not None:
        from uue.chunk_cache import TokenHiddenCache

        chunk_hidden = TokenHiddenCache(model.user_tower.encoder, featurizer, model.user_tower.hidden_cut, device,
                                        hidden_dtype)
    collate = BatchCollator(cfg, featurizer, table, config.data.shuffle_seed, chunk_vectors, chunk_hidden)
    samplers = build_samplers(cfg, table.pool_features(), sampler_seed) if wants_samplers(cfg) else Samplers()
    if cfg.distill_weight > 0:
        samplers.anchor = distillation_anchors(config, shards, model, featurizer, device, sampler_seed)
    return Inputs(table, collate, samplers)


def distillation_anchors(config: ExperimentConfig, shards: Shards, model: UUEModel, featurizer: Featurizer,
                    device: torch.device, seed: int) -> AnchorSampler:
    """The distillation's anchors (history texts of training users, drawn with the data's shuffle seed so that every
    worker draws the same, or the bank of everyday statements about people that ships with UUE): their frozen
    item-backbone vectors for the student's head and, unit, for the teacher."""
    from uue.chunk_cache import statement_vector_features

    source = config.model.distill_anchor_source
    texts = bank_anchor_texts() if source == "bank" else history_anchor_texts(
        shards.iter_train_users(), featurizer, config.model.distill_anchors, config.data.shuffle_seed)
    features = statement_vector_features(model.item_tower.encoder, featurizer.statement_features(texts),
                                         device=device)
    return AnchorSampler(features, features["item_text_vectors"], config.model.distill_anchors_per_step,
                         seed=seed + 104729)
