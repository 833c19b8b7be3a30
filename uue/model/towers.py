"""The user tower (chunks -> one vector) and the item tower (statement -> one vector)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from uue.config import ModelConfig
from uue.model.backbone import TextEncoder
from uue.model.packing import PackingOptions
from uue.model.pooling import AttentionPooling, MeanChunkPooling, WeightedMeanPooling


class MetadataFusion(nn.Module):
    """Adds a learned projection of a (hashed) metadata vector to the pooled text vector."""

    def __init__(self, metadata_dim: int, hidden_size: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(metadata_dim, hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, pooled: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return pooled + self.mlp(metadata.to(pooled.dtype))


class LowRankResidualProjection(nn.Module):
    """x + up(act(down(x))) with a rank-`rank` bottleneck; `up` starts at zero, so the untrained head is the
    identity. act is the identity (an affine correction) or a GELU (a residual MLP)."""

    def __init__(self, hidden: int, rank: int, activation: Literal["none", "gelu"] = "none"):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=activation != "none")
        self.activation: nn.Module = nn.GELU() if activation == "gelu" else nn.Identity()
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def is_affine(self) -> bool:
        return isinstance(self.activation, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.activation(self.down(x)))


class ChunkWeight(nn.Module):
    """x * (1 + w(x)): each chunk vector scaled by a learned scalar read off the vector itself (a rank-`rank` GELU
    MLP, its output layer zero-initialised, so the untrained tower is unchanged).

    A chunk keeps its direction, only its weight in the pool changes (and may turn negative): a history of
    "loved this film" and "hated that one" pools to the loved films' content minus the hated ones', still in the
    backbone's space. Unlike a free per-chunk correction, which learns directions fitted to the statements seen
    in training, a weight carries over to every statement the pretrained space can already read.
    """

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.activation = nn.GELU()
        self.up = nn.Linear(rank, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + self.up(self.activation(self.down(x))))


def build_projection(hidden: int, config: ModelConfig, activation: Literal["none", "gelu"] = "none") -> nn.Module:
    """hidden -> embedding_dim: a Linear (random, or the identity with projection_init="identity"), or with
    projection_rank > 0 the identity plus a trainable rank-r correction (`activation` inside it)."""
    if config.projection_rank or config.projection_init == "identity":
        if hidden != config.embedding_dim:
            what = f"projection_rank={config.projection_rank}" if config.projection_rank else "identity projection_init"
            raise ValueError(f"{what} needs embedding_dim == the backbone hidden size ({hidden}), "
                             f"got {config.embedding_dim}")
    if config.projection_rank:
        return LowRankResidualProjection(hidden, config.projection_rank, activation)
    projection = nn.Linear(hidden, config.embedding_dim)
    if config.projection_init == "identity":
        with torch.no_grad():
            nn.init.eye_(projection.weight)
            nn.init.zeros_(projection.bias)
    return projection


def packing_options(config: ModelConfig, checkpointing: bool, max_length: int) -> PackingOptions:
    """The packed path's options from the model config (checkpointing: the user tower's chunk recompute)."""
    return PackingOptions(
        pack_tokens=config.pack_tokens, max_sequences=config.pack_max_sequences, backend=config.pack_backend,
        compile_layers=config.compile_layers, checkpointing=config.checkpoint_granularity if checkpointing else "none",
        max_length=max_length, min_tokens=config.pack_min_tokens,
    )


def _hidden_cut(encoder: TextEncoder, trainable_layers: int | None) -> int | None:
    """Block index where a tower trained on cached hidden states starts (None: it reads tokens or vectors)."""
    if not trainable_layers:
        return None
    from uue.chunk_cache import cut_layer

    return cut_layer(encoder, trainable_layers)


class UserTower(nn.Module):
    """Encode each chunk, attention-pool the chunk vectors, fuse metadata, project, L2-normalise."""

    def __init__(self, encoder: TextEncoder, config: ModelConfig):
        super().__init__()
        hidden = encoder.hidden_size
        self.encoder = encoder
        self.micro_batch = config.encode_micro_batch
        self.checkpoint_chunks = config.gradient_checkpointing_chunks
        self.pooling: nn.Module = MeanChunkPooling()
        if config.use_attention_pooling and config.attention_pooling_kind == "weighted_mean":
            self.pooling = WeightedMeanPooling(hidden, config.attention_heads)
        elif config.use_attention_pooling:
            self.pooling = AttentionPooling(hidden, config.attention_heads, config.dropout)
        self.chunk_adapter = (
            LowRankResidualProjection(hidden, config.chunk_adapter_rank, "gelu") if config.chunk_adapter_rank else None
        )
        self.chunk_weight = ChunkWeight(hidden, config.chunk_weight_rank) if config.chunk_weight_rank else None
        self.metadata = (
            MetadataFusion(config.metadata_dim, hidden, config.dropout) if config.use_user_metadata else None
        )
        self.projection = build_projection(hidden, config, config.user_projection_activation)
        if config.attention == "packed":
            encoder.use_packing(packing_options(config, config.gradient_checkpointing_chunks, config.max_chunk_length))
        self.hidden_cut = _hidden_cut(encoder, config.hidden_cache_layers("user"))

    def encode_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) chunk tokens -> (N, H) chunk vectors, `micro_batch` chunks at a time.

        Under gradient the micro-batches are checkpointed, so only the chunk vectors stay alive between
        forward and backward: memory grows with the number of chunks by H floats each, not by activations.
        """
        if self.encoder.attention == "packed":  # packs are the micro-batches; checkpointing per packing options
            return self.encoder(input_ids, attention_mask)
        outputs = []
        recompute = self.checkpoint_chunks and torch.is_grad_enabled() and any(
            p.requires_grad for p in self.encoder.parameters()
        )
        for start in range(0, input_ids.size(0), self.micro_batch):
            ids = input_ids[start : start + self.micro_batch]
            mask = attention_mask[start : start + self.micro_batch]
            if recompute:
                outputs.append(checkpoint(self.encoder, ids, mask, use_reentrant=False))
            else:
                outputs.append(self.encoder(ids, mask))
        return torch.cat(outputs) if outputs else input_ids.new_zeros((0, self.encoder.hidden_size), dtype=torch.float)

    def chunk_vectors(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, C, L) tokens -> (B, C, H) vectors; only real chunks are encoded, padding stays zero."""
        batch, chunks, length = input_ids.shape
        if self.encoder.attention == "packed":  # real rows picked on the host: no device-side boolean indexing
            real_rows = chunk_mask.reshape(-1).bool().cpu().nonzero().squeeze(1).to(input_ids.device)
            flat_ids = input_ids.reshape(batch * chunks, length).index_select(0, real_rows)
            flat_mask = attention_mask.reshape(batch * chunks, length).index_select(0, real_rows)
            encoded = self.encode_chunks(flat_ids, flat_mask)
            vectors = encoded.new_zeros(batch * chunks, encoded.size(-1)).index_copy(0, real_rows, encoded)
            return vectors.view(batch, chunks, -1)
        real = chunk_mask.bool().reshape(-1)
        flat_ids = input_ids.reshape(batch * chunks, length)[real]
        flat_mask = attention_mask.reshape(batch * chunks, length)[real]
        encoded = self.encode_chunks(flat_ids, flat_mask)
        vectors = encoded.new_zeros(batch * chunks, encoded.size(-1))
        vectors = vectors.index_copy(0, real.nonzero().squeeze(1), encoded)
        return vectors.view(batch, chunks, -1)

    def chunk_vectors_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                                  chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, L, H) cached hidden states -> (B, C, H) chunk vectors through the top blocks only."""
        batch, chunks, length, width = hidden.shape
        real = chunk_mask.bool().reshape(-1)
        flat = hidden.reshape(batch * chunks, length, width)[real]
        flat_mask = attention_mask.reshape(batch * chunks, length)[real]
        parts = [self.encoder.forward_from_layer(flat[i : i + self.micro_batch], flat_mask[i : i + self.micro_batch],
                                                 self.hidden_cut) for i in range(0, flat.size(0), self.micro_batch)]
        encoded = torch.cat(parts)
        vectors = encoded.new_zeros(batch * chunks, encoded.size(-1))
        vectors = vectors.index_copy(0, real.nonzero().squeeze(1), encoded)
        return vectors.view(batch, chunks, -1)

    def forward(
        self,
        chunk_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        metadata: torch.Tensor | None = None,
        chunk_vectors: torch.Tensor | None = None,
        chunk_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Users -> (B, embedding_dim) unit vectors.

        Pass chunk tokens, precomputed `chunk_vectors` (B, C, H) (a frozen backbone's cache), or
        `chunk_hidden` (B, C, L, H) with `attention_mask`: hidden states at the cut (top-N training).
        """
        # Checked where the mask is on the host (the collator, serving); on a GPU the check would stall the step.
        if chunk_mask.device.type == "cpu" and not bool(chunk_mask.bool().any(1).all()):
            raise ValueError("every user needs at least one chunk (a row of chunk_mask is all False)")
        if chunk_hidden is not None:
            if self.hidden_cut is None or attention_mask is None:
                raise ValueError("chunk_hidden needs cache_hidden_states with user_trainable_layers, and the "
                                 "chunks' attention_mask")
            chunk_vectors = self.chunk_vectors_from_hidden(chunk_hidden, attention_mask, chunk_mask)
        if chunk_vectors is None:
            if input_ids is None or attention_mask is None:
                raise ValueError("UserTower needs input_ids and attention_mask, or chunk_vectors")
            chunk_vectors = self.chunk_vectors(input_ids, attention_mask, chunk_mask)
        return self._head(chunk_vectors, chunk_mask, metadata)

    def forward_ragged(
        self, chunks: Sequence[Sequence[Sequence[int] | torch.Tensor]], metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ragged users (each a list of chunk token lists) -> (B, embedding_dim), packed, never padded."""
        if any(len(user) == 0 for user in chunks):
            raise ValueError("every user needs at least one chunk (a user has an empty chunk list)")
        counts = [len(user) for user in chunks]
        encoded = self.encoder.encode_ragged([c for user in chunks for c in user])
        width = max(counts)
        slots = torch.tensor([u * width + c for u, n in enumerate(counts) for c in range(n)], device=encoded.device)
        vectors = encoded.new_zeros(len(chunks) * width, encoded.size(-1)).index_copy(0, slots, encoded)
        chunk_mask = torch.zeros(len(chunks) * width, dtype=torch.bool)
        chunk_mask[slots.cpu()] = True
        return self._head(vectors.view(len(chunks), width, -1), chunk_mask.view(len(chunks), width).to(encoded.device),
                          metadata)

    def content(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H) chunk vectors -> (B, H) unit vectors of what the history is about, in the backbone's space: the
        pool of the (weighted) chunk vectors, before any free-form correction (chunk adapter, metadata, projection).
        With mean pooling and no chunk weight it is the untrained baseline's user vector (uue.distill's teacher)."""
        if self.chunk_weight is not None:
            chunk_vectors = self.chunk_weight(chunk_vectors)
        return F.normalize(self.pooling(chunk_vectors, chunk_mask), dim=-1)

    def _head(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor, metadata: torch.Tensor | None
              ) -> torch.Tensor:
        if self.chunk_weight is not None:  # per chunk (padding rows are zero and stay zero)
            chunk_vectors = self.chunk_weight(chunk_vectors)
        if self.chunk_adapter is not None:  # per chunk (padding rows too: the pooling masks them out)
            chunk_vectors = self.chunk_adapter(chunk_vectors)
        pooled = self.pooling(chunk_vectors, chunk_mask)
        if self.metadata is not None:
            if metadata is None:
                raise ValueError("use_user_metadata is on but the batch has no user metadata")
            pooled = self.metadata(pooled, metadata)
        return F.normalize(self.projection(pooled), dim=-1)


class ItemTower(nn.Module):
    """Statement (+ context) -> pooled -> metadata fusion -> projection -> L2."""

    def __init__(self, encoder: TextEncoder, config: ModelConfig):
        super().__init__()
        hidden = encoder.hidden_size
        self.encoder = encoder
        self.metadata = (
            MetadataFusion(config.item_metadata_dim, hidden, config.dropout) if config.use_item_metadata else None
        )
        self.projection = build_projection(hidden, config)
        if config.attention == "packed":
            encoder.use_packing(packing_options(
                config, checkpointing=False, max_length=config.max_statement_length + config.max_context_length))
        self.hidden_cut = _hidden_cut(encoder, config.hidden_cache_layers("item"))

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        metadata: torch.Tensor | None = None, text_vectors: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Statements -> (N, embedding_dim) unit vectors, from tokens, precomputed `text_vectors` (N, H)
        (a frozen backbone's cache) or `hidden` (N, L, H) with `attention_mask`: hidden states at the cut."""
        if text_vectors is not None:
            pooled = text_vectors
        elif hidden is not None:
            if self.hidden_cut is None or attention_mask is None:
                raise ValueError("hidden needs cache_hidden_states with item_trainable_layers, and attention_mask")
            pooled = self.encoder.forward_from_layer(hidden, attention_mask, self.hidden_cut)
        elif input_ids is None or attention_mask is None:
            raise ValueError("ItemTower needs input_ids and attention_mask, or text_vectors")
        else:
            pooled = self.encoder(input_ids, attention_mask)
        return self._head(pooled, metadata)

    def forward_ragged(self, statements: Sequence[Sequence[int] | torch.Tensor], metadata: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Ragged statement token lists -> (N, embedding_dim), packed, never padded."""
        return self._head(self.encoder.encode_ragged(statements), metadata)

    def _head(self, pooled: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        if self.metadata is not None:
            if metadata is None:
                raise ValueError("use_item_metadata is on but the batch has no item metadata")
            pooled = self.metadata(pooled, metadata)
        return F.normalize(self.projection(pooled), dim=-1)
