"""The user tower (chunks -> one vector) and the item tower (statement -> one vector)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from uue.config import ModelConfig
from uue.model.backbone import TextEncoder, cut_layer
from uue.model.inputs import TowerInput
from uue.model.packing import PackingOptions
from uue.model.pooling import AttentionPooling, MeanChunkPooling
from uue.model.pretrained_path import StatementPretrainedPath, UserPretrainedPath


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


class DistinctRows:
    """(B, C, H) input chunk vectors, for per-chunk modules applied in turn (`apply`): each module runs once per
    distinct row and its output is gathered back, so the same line in many histories (a film and its rating in a
    MovieLens batch: about 40% of the rows) costs once, forward and backward. Exact: rows count as one only when
    bitwise equal (a float64 random projection proposes, an equality check confirms). Only for vectors that are
    inputs (the frozen-prefix cache's, no gradient of their own) on the CPU: on a GPU the check would stall the
    step and the compute is cheap anyway; elsewhere `apply` is the module on every row."""

    _probes: dict[int, torch.Tensor] = {}

    def __init__(self, vectors: torch.Tensor):
        self.shape = vectors.shape
        self.rows, self.index = vectors, None
        self._found = False  # the distinct rows are found by the first `apply` (none without per-chunk modules)

    def _find(self) -> None:
        self._found = True
        vectors = self.rows
        if vectors.requires_grad or vectors.device.type != "cpu" or vectors.dim() != 3:
            return
        flat = vectors.reshape(-1, vectors.size(-1))
        keys = flat.double() @ self._probe(flat.size(-1))
        distinct, index = torch.unique(keys, return_inverse=True)
        if len(distinct) > 0.9 * len(flat):
            return  # few repeats: not worth the gather
        first = torch.empty(len(distinct), dtype=torch.long).scatter_(0, index, torch.arange(len(flat)))
        rows = flat.index_select(0, first)
        if torch.equal(rows.index_select(0, index), flat):  # a collision of unequal rows: every row, as given
            self.rows, self.index = rows, index

    @classmethod
    def _probe(cls, width: int) -> torch.Tensor:
        """A fixed random float64 direction per width (the CPU's: only CPU vectors are grouped)."""
        if width not in cls._probes:
            cls._probes[width] = torch.randn(width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
        return cls._probes[width]

    def apply(self, module: nn.Module) -> torch.Tensor:
        """module(rows) -> (B, C, H'), and the rows the next module reads."""
        if not self._found:
            self._find()
        self.rows = module(self.rows)
        if self.index is None:
            return self.rows
        return self.rows.index_select(0, self.index).view(*self.shape[:-1], self.rows.size(-1))


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
    heads, embedding_dim = config.heads, config.towers.embedding_dim
    if heads.projection_rank or heads.projection_init == "identity":
        if hidden != embedding_dim:
            what = f"projection_rank={heads.projection_rank}" if heads.projection_rank else "identity projection_init"
            raise ValueError(f"{what} needs embedding_dim == the backbone hidden size ({hidden}), got {embedding_dim}")
    if heads.projection_rank:
        return LowRankResidualProjection(hidden, heads.projection_rank, activation)
    projection = nn.Linear(hidden, embedding_dim)
    if heads.projection_init == "identity":
        with torch.no_grad():
            nn.init.eye_(projection.weight)
            nn.init.zeros_(projection.bias)
    return projection


def packing_options(config: ModelConfig, checkpointing: bool, max_length: int) -> PackingOptions:
    """The packed path's options from the model config (checkpointing: the user tower's chunk recompute)."""
    packing = config.packing
    return PackingOptions(
        pack_tokens=packing.pack_tokens, max_sequences=packing.pack_max_sequences, backend=packing.pack_backend,
        compile_layers=packing.compile_layers, max_length=max_length, min_tokens=packing.pack_min_tokens,
        checkpointing=packing.checkpoint_granularity if checkpointing else "none",
    )


def _hidden_cut(encoder: TextEncoder, trainable_layers: int | None) -> int | None:
    """Block index where a tower trained on cached hidden states starts (None: it reads tokens or vectors)."""
    return cut_layer(encoder.backbone, trainable_layers) if trainable_layers else None


class _OutputWidth:
    """What both towers' vectors add up to: `embedding_dim`, plus the backbone's width once a pretrained path
    (uue.model.pretrained_path) is fitted after training; `pretrained_path` is None while training and when the
    config has none."""

    embedding_dim: int
    pretrained_path: UserPretrainedPath | StatementPretrainedPath | None

    @property
    def output_dim(self) -> int:
        return self.embedding_dim + (self.pretrained_path.width if self.pretrained_path is not None else 0)


class UserTower(_OutputWidth, nn.Module):
    """Encode each chunk, attention-pool the chunk vectors, fuse metadata, project, L2-normalise."""

    def __init__(self, encoder: TextEncoder, config: ModelConfig):
        super().__init__()
        hidden = encoder.hidden_size
        towers, heads = config.towers, config.heads
        self.encoder = encoder
        self.embedding_dim = towers.embedding_dim
        self.micro_batch = towers.encode_micro_batch
        self.checkpoint_chunks = towers.gradient_checkpointing_chunks
        self.pooling: nn.Module = MeanChunkPooling()
        if config.pooling.use_attention_pooling:
            self.pooling = AttentionPooling(hidden, config.pooling.attention_heads, heads.dropout)
        rank = config.pooling.chunk_adapter_rank
        self.chunk_adapter = LowRankResidualProjection(hidden, rank, "gelu") if rank else None
        weight_rank = config.pooling.chunk_weight_rank
        self.chunk_weight = ChunkWeight(hidden, weight_rank) if weight_rank else None
        self.metadata = MetadataFusion(heads.metadata_dim, hidden, heads.dropout) if heads.use_user_metadata else None
        self.projection = build_projection(hidden, config, heads.user_projection_activation)
        if config.packing.attention == "packed":
            encoder.use_packing(packing_options(config, towers.gradient_checkpointing_chunks, towers.max_chunk_length))
        if config.packing.compile_backbone:
            encoder.compile_backbone()
        self.hidden_cut = _hidden_cut(encoder, config.hidden_cache_layers("user"))
        self.pretrained_path: UserPretrainedPath | None = None

    def encode_chunks(self, chunks: TowerInput) -> torch.Tensor:
        """(N, ...) chunks -> (N, H) chunk vectors, `micro_batch` chunks at a time.

        Under gradient, token micro-batches are checkpointed, so only the chunk vectors stay alive between
        forward and backward: memory grows with the number of chunks by H floats each, not by activations.
        """
        if chunks.vectors is not None:
            return chunks.vectors
        if chunks.input_ids is not None and self.encoder.attention == "packed":
            return self.encoder.encode(chunks)  # packs are the micro-batches; checkpointing per packing options
        recompute = chunks.input_ids is not None and self.checkpoint_chunks and torch.is_grad_enabled() and any(
            p.requires_grad for p in self.encoder.parameters()
        )
        outputs = []
        for start in range(0, chunks.rows, self.micro_batch):
            part = chunks.map(lambda t, start=start: t[start : start + self.micro_batch])
            if recompute:
                outputs.append(checkpoint(self.encoder, part.input_ids, part.attention_mask, use_reentrant=False))
            else:
                outputs.append(self.encoder.encode(part))
        if not outputs:
            return torch.zeros((0, self.encoder.hidden_size), device=chunks.attention_mask.device)
        return torch.cat(outputs)

    def chunk_vectors(self, chunks: TowerInput, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) chunks -> (B, C, H) vectors; only real chunks are encoded, padding stays zero."""
        if chunks.vectors is not None:
            return chunks.vectors
        batch, slots = chunk_mask.shape
        # Real rows picked on the host: no device-side boolean indexing.
        real_rows = chunk_mask.reshape(-1).bool().cpu().nonzero().squeeze(1).to(chunk_mask.device)
        flat = chunks.map(lambda t: t.reshape(batch * slots, *t.shape[2:]).index_select(0, real_rows))
        encoded = self.encode_chunks(flat)
        vectors = encoded.new_zeros(batch * slots, encoded.size(-1)).index_copy(0, real_rows, encoded)
        return vectors.view(batch, slots, -1)

    def forward(self, chunks: TowerInput, chunk_mask: torch.Tensor, metadata: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Users -> (B, embedding_dim) unit vectors from (B, C, ...) chunks and the (B, C) mask of real ones."""
        # Checked where the mask is on the host (the collator, serving); on a GPU the check would stall the step.
        if chunk_mask.device.type == "cpu" and not bool(chunk_mask.bool().any(1).all()):
            raise ValueError("every user needs at least one chunk (a row of chunk_mask is all False)")
        return self.pool(self.chunk_vectors(chunks, chunk_mask), chunk_mask, metadata)

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
        return self.pool(vectors.view(len(chunks), width, -1),
                         chunk_mask.view(len(chunks), width).to(encoded.device), metadata)

    def content(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H) chunk vectors -> (B, H) unit vectors of what the history is about, in the backbone's space: the
        pool of the (weighted) chunk vectors, before any free-form correction (chunk adapter, metadata, projection).
        With mean pooling and no chunk weight it is the untrained baseline's user vector (uue.train.distill's
        teacher)."""
        if self.chunk_weight is not None:
            chunk_vectors = self.chunk_weight(chunk_vectors)
        return F.normalize(self.pooling(chunk_vectors, chunk_mask), dim=-1)

    def pool(self, chunk_vectors: torch.Tensor, chunk_mask: torch.Tensor, metadata: torch.Tensor | None
             ) -> torch.Tensor:
        """The head: (B, C, H) chunk vectors -> (B, output_dim) user vectors (adapter, pooling, metadata,
        projection; unit unless a pretrained path is fitted)."""
        per_chunk = DistinctRows(chunk_vectors)
        if self.chunk_weight is not None:  # per chunk (padding rows are zero and stay zero)
            chunk_vectors = per_chunk.apply(self.chunk_weight)
        weighted_backbone_vectors = chunk_vectors  # what `content` pools, and the pretrained path with it
        if self.chunk_adapter is not None:  # per chunk (padding rows too: the pooling masks them out)
            chunk_vectors = per_chunk.apply(self.chunk_adapter)
        pooled = self.pooling(chunk_vectors, chunk_mask)
        if self.metadata is not None:
            if metadata is None:
                raise ValueError("use_user_metadata is on but the batch has no user metadata")
            pooled = self.metadata(pooled, metadata)
        out = F.normalize(self.projection(pooled), dim=-1)
        if self.pretrained_path is not None:
            out = self.pretrained_path(out, weighted_backbone_vectors, chunk_mask)
        return out


class ItemTower(_OutputWidth, nn.Module):
    """Statement (+ context) -> pooled -> metadata fusion -> projection -> L2."""

    def __init__(self, encoder: TextEncoder, config: ModelConfig):
        super().__init__()
        hidden = encoder.hidden_size
        heads = config.heads
        self.encoder = encoder
        self.embedding_dim = config.towers.embedding_dim
        self.metadata = (
            MetadataFusion(heads.item_metadata_dim, hidden, heads.dropout) if heads.use_item_metadata else None
        )
        self.projection = build_projection(hidden, config)
        if config.packing.attention == "packed":
            towers = config.towers
            encoder.use_packing(packing_options(
                config, checkpointing=False, max_length=towers.max_statement_length + towers.max_context_length))
        if config.packing.compile_backbone:
            encoder.compile_backbone()
        self.hidden_cut = _hidden_cut(encoder, config.hidden_cache_layers("item"))
        self.pretrained_path: StatementPretrainedPath | None = None

    def forward(self, text: TowerInput, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """(N, ...) statements -> (N, output_dim) unit vectors."""
        return self._head(self.encoder.encode(text), metadata)

    def forward_ragged(self, statements: Sequence[Sequence[int] | torch.Tensor], metadata: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Ragged statement token lists -> (N, embedding_dim), packed, never padded."""
        return self._head(self.encoder.encode_ragged(statements), metadata)

    def _head(self, pooled: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        backbone_vector = pooled
        if self.metadata is not None:
            if metadata is None:
                raise ValueError("use_item_metadata is on but the batch has no item metadata")
            pooled = self.metadata(pooled, metadata)
        out = F.normalize(self.projection(pooled), dim=-1)
        if self.pretrained_path is not None:
            out = self.pretrained_path(out, backbone_vector)
        return out
