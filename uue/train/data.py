"""What a training process reads: the preprocessed shards (made first from a raw folder), the statement
table, the batch collator and the samplers, built the same way in one process and in a Ray worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from uue.config import ExperimentConfig
from uue.data.featurize import Featurizer
from uue.data.readers import UUEDataset, load_dataset
from uue.data.shards import Shards, check_manifest, is_preprocessed, preprocess_local
from uue.model.cache import FrozenPrefixCache, resolve_cache_dir
from uue.model.inputs import StatementBatch, TowerInput
from uue.model.towers import ItemTower, UserTower
from uue.model.uue_model import UUEModel
from uue.train.distill import AnchorSampler, bank_anchor_texts, history_anchor_texts
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
                 device: torch.device, sampler_seed: int, share_tables: bool = False) -> Inputs:
    """The statement table, the collator and the samplers of one process. A frozen item backbone
    (cache_statement_vectors) or a frozen bottom below the item tower's cut (cache_hidden_states) puts what the
    frozen-prefix cache computes for each statement in the table; the collator reads users' chunks from the
    user backbone's cache likewise. The caches run the frozen part once per process, outside any engine's
    forward. `share_tables`: the caches join the process's shared table of their backbone (the local trainer,
    after which the pretrained path's fit, calibration and evaluation read what training encoded; a Ray worker
    has no one to share with and skips the backbone's fingerprint)."""
    cfg = config.model
    caching = cfg.caching
    hidden_dtype = getattr(torch, caching.hidden_cache_dtype)
    cache_dir = resolve_cache_dir(caching.cache_dir)

    def frozen_prefix(tower: UserTower | ItemTower, tokenizer: PreTrainedTokenizerBase, whole: bool
                      ) -> FrozenPrefixCache | None:
        """The tower's cache: its whole backbone (`whole`, frozen), the bottom below its cut, or none."""
        if not whole and tower.hidden_cut is None:
            return None
        return FrozenPrefixCache(tower.encoder, tokenizer, None if whole else tower.hidden_cut, device=device,
                                 micro_batch=cfg.towers.encode_micro_batch, hidden_dtype=hidden_dtype,
                                 cache_dir=cache_dir, shared=share_tables)

    table = StatementTable(shards.statements(), featurizer,
                           frozen_prefix(model.item_tower, model.item_tokenizer, caching.cache_statement_vectors))
    chunk_cache = frozen_prefix(model.user_tower, model.user_tokenizer, caching.cache_chunk_vectors)
    collate = BatchCollator(cfg, featurizer, table, config.data.shuffle_seed, chunk_cache)
    samplers = build_samplers(cfg, table, sampler_seed) if wants_samplers(cfg) else Samplers()
    if cfg.loss.distill_weight > 0:  # the config guarantees a frozen item backbone: its cache is the teacher
        anchor_cache = frozen_prefix(model.item_tower, model.item_tokenizer, True)
        samplers.anchor = distillation_anchors(config, shards, featurizer, anchor_cache, sampler_seed)
    return Inputs(table, collate, samplers)


def distillation_anchors(config: ExperimentConfig, shards: Shards, featurizer: Featurizer, cache: FrozenPrefixCache,
                         seed: int) -> AnchorSampler:
    """The distillation's anchors (history texts of training users, drawn with the data's shuffle seed so that every
    worker draws the same, or the bank of everyday statements about people that ships with UUE): their frozen
    item-backbone vectors, what the student's head reads and, unit, the teacher."""
    loss = config.model.loss
    texts = bank_anchor_texts() if loss.distill_anchor_source == "bank" else history_anchor_texts(
        shards.iter_train_users(), featurizer, loss.distill_anchors, config.data.shuffle_seed)
    vectors = torch.as_tensor(np.stack(cache.lookup(featurizer.statement_tokens(texts), by_length=False,
                                                    micro_batch=64)))
    cache.save()
    metadata = featurizer.statement_metadata(texts)
    statements = StatementBatch(TowerInput(vectors=vectors), None if metadata is None else torch.as_tensor(metadata))
    return AnchorSampler(statements, vectors, loss.distill_anchors_per_step, seed=seed + 104729)
