"""Padding-free encoding: ragged token sequences packed into fixed token budgets.

Why: a padded (N, L) batch spends the same compute on a 12-token chunk as on a 250-token one. Here the
sequences of a batch are laid end to end in packs, each with its own position ids restarting at 0 and its
boundaries (`cu_seqlens`); attention never crosses a boundary, and pooling reads each sequence at its
boundaries (last token for decoders, masked mean for BERT-style encoders).

Pack widths (`plan_bucketed_packs`): a call's sequences fill full packs of `pack_tokens` in input order,
and what is left (less than one pack) goes into packs of the ladder pack_tokens / 2, / 4, ... down to
`min_tokens` (default pack_tokens / 32), the binary decomposition of its size rounded up to the smallest
width. Every pack has one of these few static widths (at most 6 shapes by default, so a compiled layer
compiles a handful of graphs), and padding is what the smallest width rounds up plus what sequences
leave unfilled: under 5% of the computed tokens on MovieLens steps (tests/test_packing.py), where a
single `pack_tokens` tail cost 30% (64 chunks of ~11.4k tokens in one 16k pack). Powers of two rather
than multiples of pack_tokens / 8: with as many shapes, one pack of a bucketed width wastes up to an
eighth of pack_tokens per call (0.92 fill on that 64-chunk step), the ladder about one smallest width.

Attention backends, all behind one attention function registered with the installed transformers'
public `AttentionInterface` under the name "uue_packed" (so every Hugging Face layer calls it, unpatched):

- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash kernels: CUDA, bf16/fp16 only);
- "flex": `flex_attention` with a document (block-diagonal, causal for decoders) `BlockMask`; forward
  and backward on CUDA, forward only on CPU (torch 2.13 has no CPU flex backward);
- "sdpa_mask": SDPA with a dense boolean block-diagonal mask: runs everywhere, with gradients (the CPU
  path), O(pack_tokens^2) mask memory;
- "auto": varlen on CUDA in bf16/fp16, flex on CUDA otherwise, sdpa_mask on CPU.

Without packing kwargs the registered function is Hugging Face's own SDPA, so the padded path of the same
model (the reference) is unchanged. Packed attention applies no attention-probability dropout (as flash
varlen); hidden-state dropout still applies.

Host syncs: the pack layout is planned on the host from host-side lengths (ragged input: none at all;
a padded (N, L) batch: one device->host copy of its row lengths per call), and moved to the device with
non-blocking copies; nothing in the per-pack loop reads a device value.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PackBackend = Literal["auto", "varlen", "flex", "sdpa_mask"]
CheckpointGranularity = Literal["none", "chunks", "layers"]
ATTN_IMPLEMENTATION = "uue_packed"
_VARLEN_LENGTH_BUCKET = 64  # max sequence length handed to varlen, rounded up: few distinct compiled graphs


# ------------------------------------------------------------------------------------------- planning


def plan_packs(lengths: Sequence[int], pack_tokens: int, max_sequences: int) -> list[list[int]]:
    """Order-preserving next-fit: consecutive sequences share a pack until its tokens or slots run out.

    Next-fit wastes less than one sequence per closed pack (under 2% for 250-token chunks in 16k-token
    packs); the last pack is what `plan_bucketed_packs` narrows.
    """
    if pack_tokens < 1 or max_sequences < 1:
        raise ValueError(f"pack_tokens ({pack_tokens}) and max_sequences ({max_sequences}) must be >= 1")
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sequence {index} is empty: every packed sequence needs at least one token")
        if n > pack_tokens:
            raise ValueError(f"sequence {index} has {n} tokens, more than pack_tokens={pack_tokens}")
        if current and (used + n > pack_tokens or len(current) == max_sequences):
            packs.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        packs.append(current)
    return packs


def pack_widths(pack_tokens: int, min_tokens: int) -> list[int]:
    """The static pack shapes: pack_tokens, pack_tokens // 2, ... down to the smallest >= min_tokens."""
    widths = [pack_tokens]
    while widths[-1] // 2 >= max(1, min_tokens):
        widths.append(widths[-1] // 2)
    return widths


@dataclass(frozen=True)
class PlannedPack:
    """One pack of a plan: its width (one of `pack_widths`) and the sequences it holds, in pack order."""

    width: int
    members: list[int]


def plan_bucketed_packs(lengths: Sequence[int], widths: Sequence[int], max_sequences: int) -> list[PlannedPack]:
    """Full packs of widths[0] (next-fit, input order), then the rest in packs of the smaller widths.

    The rest (the last next-fit pack, under widths[0] tokens) is sized up to a multiple of the smallest
    width and split into the widths of that size's binary decomposition (e.g. 11.4k tokens with widths
    16384..512: 8192 + 2048 + 1024 + 512); its sequences go in longest first, each into the fullest pack
    it fits (best-fit decreasing). What does not fit starts the same again. `widths` must run down from
    widths[0] by halving, the smallest holding the longest sequence, so any sequence fits an empty pack.
    """
    packs = plan_packs(lengths, widths[0], max_sequences)  # checks every length
    if not packs:
        return []
    if max(lengths) > widths[-1]:
        raise ValueError(f"the smallest pack width {widths[-1]} must hold the longest sequence ({max(lengths)})")
    plan = [PlannedPack(widths[0], members) for members in packs[:-1]]
    rest = sorted(packs[-1], key=lambda i: -lengths[i])
    while rest:
        size = -(-sum(lengths[i] for i in rest) // widths[-1]) * widths[-1]
        bins: list[PlannedPack] = []
        for width in widths:
            if size >= width:
                bins.append(PlannedPack(width, []))
                size -= width
        free = [b.width for b in bins]
        left = []
        for index in rest:
            fits = [k for k, b in enumerate(bins) if free[k] >= lengths[index] and len(b.members) < max_sequences]
            if not fits:
                left.append(index)
                continue
            best = min(fits, key=lambda k: free[k])
            bins[best].members.append(index)
            free[best] -= lengths[index]
        plan += [b for b in bins if b.members]
        rest = left
    return plan


@dataclass
class PackLayout:
    """Host-side description of one pack: where each of its sequences lies in the `pack_tokens`-wide row
    (this pack's width, one of `pack_widths`).

    The tail after the last sequence is filler: attending only to itself, outputs discarded. In `cu_seqlens`
    it is cut into segments of at most `filler_segment` tokens (varlen kernels size their grid by the longest
    segment; a longer one would leave outputs unwritten, and garbage times a zero gradient is still NaN).
    `cu_seqlens` has the fixed length `max_sequences + 2 + ceil(pack_tokens / filler_segment)` (zero-length
    segments repeat the end) so that compiled code sees one shape.
    """

    sequences: list[int]  # indices into the encoded batch
    lengths: list[int]
    pack_tokens: int
    max_sequences: int
    filler_segment: int = 0  # 0: the whole tail is one segment

    @property
    def useful_tokens(self) -> int:
        return sum(self.lengths)

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """Position ids, segment ids, cu_seqlens, last-token indices and lengths, on the CPU."""
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        n, used = len(self.lengths), self.useful_tokens
        starts = torch.cumsum(lengths, 0) - lengths
        segment = torch.full((self.pack_tokens,), n, dtype=torch.long)  # filler = segment n
        segment[:used] = torch.repeat_interleave(torch.arange(n), lengths)
        positions = torch.zeros(self.pack_tokens, dtype=torch.long)  # filler at position 0 (BERT caps positions)
        positions[:used] = torch.arange(used) - torch.repeat_interleave(starts, lengths)
        step = self.filler_segment or self.pack_tokens
        cu = torch.full((self.max_sequences + 2 + math.ceil(self.pack_tokens / step),), self.pack_tokens,
                        dtype=torch.int32)
        cu[0] = 0
        cu[1 : n + 1] = torch.cumsum(lengths, 0).to(torch.int32)
        tail_ends = torch.tensor(list(range(used + step, self.pack_tokens, step)), dtype=torch.int32)
        cu[n + 1 : n + 1 + tail_ends.numel()] = tail_ends
        return {"positions": positions, "segment": segment, "cu_seqlens": cu,
                "last": starts + lengths - 1, "lengths": lengths}


# ------------------------------------------------------------------------------------------ attention


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.attention.varlen` exists here and can run (its flash kernels: CUDA, half types)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def resolve_backend(backend: PackBackend, device: torch.device, dtype: torch.dtype, training: bool) -> str:
    """The concrete backend `auto` means on this device, or a clear error when the requested one cannot run."""
    if backend == "auto":
        if varlen_available(device, dtype):
            return "varlen"
        return "flex" if device.type == "cuda" else "sdpa_mask"
    if backend == "varlen" and not varlen_available(device, dtype):
        raise ValueError(f"pack_backend=varlen needs torch.nn.attention.varlen on CUDA in bf16/fp16 "
                         f"(here: {device.type}, {dtype}); use auto, flex or sdpa_mask")
    if backend == "flex" and device.type == "cpu" and training:
        raise ValueError("pack_backend=flex has no backward on CPU in this torch; use sdpa_mask (or auto) to train")
    return backend


@dataclass
class PackedAttention:
    """What the registered attention function needs for one pack (passed as the `uue_pack` kwarg)."""

    backend: str
    causal: bool
    cu_seqlens: torch.Tensor | None = None
    max_length: int = 0
    block_mask: Any = None
    dense_mask: torch.Tensor | None = None


def _document_block_mask(segment: torch.Tensor, causal: bool) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q, kv):  # noqa: ANN001 (flex mask_mod signature)
        keep = segment[q] == segment[kv]
        return keep & (q >= kv) if causal else keep

    length = segment.numel()
    return create_block_mask(same_document, None, None, length, length, device=segment.device)


def _dense_mask(segment: torch.Tensor, causal: bool) -> torch.Tensor:
    keep = segment[:, None] == segment[None, :]
    if causal:
        keep = keep & torch.ones_like(keep).tril()
    return keep[None, None]


def build_packed_attention(backend: str, causal: bool, tensors: dict[str, torch.Tensor], max_length: int
                           ) -> PackedAttention:
    """The per-pack attention inputs for `backend`, from device tensors of `PackLayout.host_tensors`."""
    if backend == "varlen":  # max_length: bounds every segment of cu_seqlens, filler included
        return PackedAttention(backend, causal, cu_seqlens=tensors["cu_seqlens"], max_length=max_length)
    if backend == "flex":
        return PackedAttention(backend, causal, block_mask=_document_block_mask(tensors["segment"], causal))
    if backend == "sdpa_mask":
        return PackedAttention(backend, causal, dense_mask=_dense_mask(tensors["segment"], causal))
    raise ValueError(f"unknown pack backend {backend!r} (varlen, flex, sdpa_mask)")


def packed_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The "uue_packed" attention: (1, H, T, D) packed queries -> (1, T, H, D); padded SDPA without a pack."""
    pack: PackedAttention | None = kwargs.pop("uue_pack", None)
    if pack is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    if pack.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, heads, D), as flash wants
        accepted = _varlen_parameters()
        extra: dict[str, Any] = {}
        if "window_size" in accepted:  # torch 2.13; older releases (2.9-2.11) take is_causal
            extra["window_size"] = (-1, 0) if pack.causal else (-1, -1)
        else:
            extra["is_causal"] = pack.causal
        if gqa and "enable_gqa" in accepted:
            extra["enable_gqa"] = True
        elif gqa:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if "scale" in accepted:
            extra["scale"] = scaling
        elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
            raise ValueError(f"this torch's varlen_attn has no scale argument and the model scales by {scaling}")
        out = varlen_attn(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_length, pack.max_length, **extra)
        return out.unsqueeze(0), None
    if pack.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(query, key, value, block_mask=pack.block_mask, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=pack.dense_mask, scale=scaling,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """Keyword names the installed `varlen_attn` takes (its signature changed between torch releases)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def register_packed_attention() -> None:
    """Register "uue_packed" with transformers' public attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # the padded path's masks: as for sdpa


# ------------------------------------------------------------------------------------- the packed model


def _layers_and_kind(backbone: nn.Module) -> tuple[nn.ModuleList, str]:
    """The repeated blocks and how to run around them: "decoder" (Qwen3/Llama-style) or "encoder" (BERT)."""
    if all(hasattr(backbone, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return backbone.layers, "decoder"
    encoder = getattr(backbone, "encoder", None)
    if hasattr(backbone, "embeddings") and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder.layer, "encoder"
    raise ValueError(f"packed attention supports Qwen3/Llama-style decoders and BERT-style encoders, "
                     f"not {type(backbone).__name__}")


@dataclass(frozen=True)
class PackingOptions:
    """How a TextEncoder runs its packed path (ModelConfig: pack_tokens, pack_max_sequences, pack_min_tokens,
    pack_backend, compile_layers, checkpoint_granularity)."""

    pack_tokens: int = 8192
    max_sequences: int | None = None  # None: pack_tokens // 8
    backend: PackBackend = "auto"
    compile_layers: bool = False
    checkpointing: CheckpointGranularity = "none"
    max_length: int | None = None  # longest sequence fed (static varlen bound); None: per pack, bucketed
    compile_backend: str = "inductor"  # "eager": dynamo tracing only (quick CPU checks of the compile path)
    min_tokens: int | None = None  # smallest pack width (None: pack_tokens // 32); pack_tokens: all full width

    @property
    def slots(self) -> int:
        return self.max_sequences or max(1, self.pack_tokens // 8)

    def widths(self, longest: int) -> list[int]:
        """The pack widths a call may use: the ladder down to min_tokens, none narrower than `longest`."""
        smallest = max(self.min_tokens or self.pack_tokens // 32, longest)
        return pack_widths(self.pack_tokens, smallest)


@dataclass
class PackStats:
    """Tokens the packs held (useful) and computed (their widths), summed since the last `take_pack_stats`."""

    useful: int = 0
    computed: int = 0
    packs: int = 0


class PackedRunner:
    """Runs a Hugging Face backbone over packs; owns the regionally compiled layers (not parameters)."""

    def __init__(self, backbone: nn.Module, options: PackingOptions, causal: bool):
        register_packed_attention()
        self.backbone = backbone
        self.options = options
        self.causal = causal
        self.layers, self.kind = _layers_and_kind(backbone)
        if backbone.config._attn_implementation != ATTN_IMPLEMENTATION:
            backbone.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._compiled: list[nn.Module] | None = None
        self.stats = PackStats()

    def __getstate__(self) -> dict[str, Any]:
        # Compiled wrappers are a cache: copies and pickles (Ray, checkpoints) recompile on first use.
        return {**self.__dict__, "_compiled": None}

    def layer_callables(self) -> list[nn.Module]:
        """Each block, or (compile_layers) each block under `torch.compile`: regional compilation, one graph
        reused by all blocks of the same shape because parameters are graph inputs."""
        if not self.options.compile_layers:
            return list(self.layers)
        if self._compiled is None:
            # One graph per pack width, grad mode and tower sharing the layer class: more than dynamo's default
            # recompile limit (8), past which further shapes would silently run eager.
            needed = 4 * len(self.options.widths(1))
            if torch._dynamo.config.recompile_limit < needed:
                torch._dynamo.config.recompile_limit = needed
            self._compiled = [torch.compile(layer, dynamic=False, backend=self.options.compile_backend)
                              for layer in self.layers]
        return self._compiled

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: PackedAttention
                      ) -> torch.Tensor:
        """(T,) packed ids and positions -> (T, H) final token states, attention confined to segments."""
        ids, pos = input_ids[None], positions[None]
        model = self.backbone
        if self.kind == "decoder":
            hidden = model.embed_tokens(ids)
            extra: dict[str, Any] = {"position_embeddings": model.rotary_emb(hidden, pos), "position_ids": pos,
                                     "use_cache": False}
        else:
            hidden = model.embeddings(input_ids=ids, position_ids=pos, token_type_ids=torch.zeros_like(ids))
            extra = {}
        per_layer = self.options.checkpointing == "layers" and torch.is_grad_enabled()
        for layer in self.layer_callables():
            if per_layer:
                hidden = checkpoint(layer, hidden, None, use_reentrant=False, uue_pack=attention, **extra)
            else:
                hidden = layer(hidden, None, uue_pack=attention, **extra)
        if self.kind == "decoder":
            hidden = model.norm(hidden)
        return hidden[0]


def pool_packed(hidden: torch.Tensor, tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(T, H) pack states -> (n, H): each segment's last token, or its mean (filler segment dropped)."""
    if kind == "last_token":
        return hidden[tensors["last"]]
    n = tensors["lengths"].numel()
    sums = hidden.new_zeros(n + 1, hidden.size(-1)).index_add_(0, tensors["segment"], hidden)[:n]
    return sums / tensors["lengths"].to(hidden.dtype)[:, None]


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
    return {k: v.to(device) for k, v in tensors.items()}


def take_pack_stats(model: nn.Module) -> PackStats:
    """The pack counts of every packed encoder in `model` since the last call, summed; resets them."""
    total = PackStats()
    for module in model.modules():
        for runner in (v for v in vars(module).values() if isinstance(v, PackedRunner)):
            total.useful += runner.stats.useful
            total.computed += runner.stats.computed
            total.packs += runner.stats.packs
            runner.stats = PackStats()
    return total


def _pack_token_index(members: list[int], offsets: list[int], gather: torch.Tensor, width: int) -> torch.Tensor:
    """Host positions in the flat ids of a pack's tokens, in pack order; filler reads flat token 0 (discarded)."""
    index = torch.zeros(width, dtype=torch.long)
    if members == list(range(members[0], members[-1] + 1)):  # full packs: one run of the input
        tokens = gather[offsets[members[0]] : offsets[members[-1] + 1]]
    else:
        tokens = torch.cat([gather[offsets[i] : offsets[i + 1]] for i in members])
    index[: tokens.numel()] = tokens
    return index


def encode_packed(
    runner: PackedRunner, pooling: str, lengths: Sequence[int], gather: torch.Tensor, flat_ids: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Encode sequences whose tokens are `flat_ids[gather[starts[i] : starts[i] + lengths[i]]]` -> (N, H).

    `gather` is a host tensor mapping each sequence's tokens (concatenated) to positions in `flat_ids`
    (a device tensor); packs are built by one device gather each, with no host read of device values, and
    the rows come back in input order (narrow packs hold sequences out of order) by one device gather.
    """
    options = runner.options
    device = flat_ids.device
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    outputs = []
    longest_real = max(lengths, default=0)
    if options.max_length and longest_real > options.max_length:
        raise ValueError(f"a sequence has {longest_real} tokens, more than the packed path's max_length="
                         f"{options.max_length}")
    longest = options.max_length or longest_real
    bucket = min(options.pack_tokens, _VARLEN_LENGTH_BUCKET * math.ceil(max(longest, 1) / _VARLEN_LENGTH_BUCKET))
    grad = torch.is_grad_enabled()
    plan = plan_bucketed_packs(lengths, options.widths(longest), options.slots)
    for pack in plan:
        members = pack.members
        layout = PackLayout(members, [lengths[i] for i in members], pack.width, options.slots,
                            filler_segment=bucket if backend == "varlen" else 0)
        runner.stats.useful += layout.useful_tokens
        runner.stats.computed += pack.width
        runner.stats.packs += 1
        host = layout.host_tensors()
        host["index"] = _pack_token_index(members, offsets, gather, pack.width)
        tensors = _to_device(host, device)
        ids = flat_ids[tensors["index"]]
        attention = build_packed_attention(backend, runner.causal, tensors, bucket)

        def run(ids: torch.Tensor, tensors: dict[str, torch.Tensor] = tensors,
                attention: PackedAttention = attention) -> torch.Tensor:
            return pool_packed(runner.hidden_states(ids, tensors["positions"], attention), tensors, pooling)

        if grad and options.checkpointing == "chunks":
            outputs.append(checkpoint(run, ids, use_reentrant=False))
        else:
            outputs.append(run(ids))
    if not outputs:
        return flat_ids.new_zeros((0, int(runner.backbone.config.hidden_size)), dtype=torch.float)
    vectors = torch.cat(outputs)
    order = [i for pack in plan for i in pack.members]
    if order == list(range(len(order))):
        return vectors
    rows = torch.empty(len(order), dtype=torch.long)
    rows[torch.tensor(order)] = torch.arange(len(order))
    return vectors[_to_device({"rows": rows}, device)["rows"]]


def ragged_to_flat(sequences: Sequence[Sequence[int] | torch.Tensor], device: torch.device
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Ragged token lists -> (lengths, host gather index, flat device ids): no padding is ever built."""
    parts = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    lengths = [int(p.numel()) for p in parts]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return lengths, torch.arange(sum(lengths)), flat


def padded_to_flat(input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A padded (N, L) batch (left or right padded) -> (lengths, host gather index, flat device ids).

    One device->host copy of per-row lengths and first-token offsets; a row whose mask has holes or is
    empty is an error naming the row.
    """
    mask = attention_mask.to(torch.int32)
    n, length = mask.shape
    counts = mask.sum(1)
    first = mask.argmax(1)
    last = length - 1 - mask.flip(1).argmax(1)
    stats = torch.stack([counts, first, last]).cpu()  # the one sync per call
    counts_h, first_h, last_h = stats[0], stats[1], stats[2]
    bad_rows = ((counts_h == 0) | (last_h - first_h + 1 != counts_h)).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"attention_mask rows {bad_rows[:10]} are empty or not contiguous: the packed path needs "
                         "each row's real tokens in one run (left or right padding)")
    lengths = counts_h.tolist()
    row_starts = torch.arange(n) * length + first_h
    gather = torch.repeat_interleave(row_starts, counts_h) + (
        torch.arange(int(counts_h.sum())) - torch.repeat_interleave(torch.cumsum(counts_h, 0) - counts_h, counts_h)
    )
    return lengths, gather, input_ids.reshape(-1)
